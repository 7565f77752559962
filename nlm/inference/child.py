"""Child processes nlm manages (vLLM's server): started so that they cannot outlive nlm, even a SIGKILLed nlm.

`start_child` runs `python nlm/inference/child_guard.py NLM_PID MODULE ARGS` in a session of its own: the guard
runs the module and stops it (and its process group) when nlm dies or when it is asked to stop (see
child_guard.py). A session of its own keeps a Ctrl-C or a signal to nlm's process group from stopping the child
under in-flight requests; nlm stops it itself, after they have finished.

Linux's parent-death signal fires when the *thread* that started the child ends, not the process: the models
load on a short-lived thread, so children are started from the main thread, or, when called from another
thread, from one spawner thread that lives as long as the process.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

GUARD = Path(__file__).with_name("child_guard.py")


class _Spawner:
    """One daemon thread that starts processes for the threads that do not last (it never ends before the process)."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="nlm-child-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, future = self._calls.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def call(self, fn: Callable[[], Any]) -> Any:
        future: Future = Future()
        self._calls.put((fn, future))
        return future.result()


_SPAWNER: _Spawner | None = None
_SPAWNER_LOCK = threading.Lock()


def _on_lasting_thread(fn: Callable[[], Any]) -> Any:
    global _SPAWNER
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = _Spawner()
    return _SPAWNER.call(fn)


def start_child(python: str, module: str, args: Sequence[str], env: Mapping[str, str] | None = None,
                **popen: Any) -> subprocess.Popen:
    """`python -m module args` under the guard, in its own session; the Popen is the guard's (its pid leads the
    group that holds the module and everything it starts)."""
    command = [python, str(GUARD), str(os.getpid()), module, *args]
    return _on_lasting_thread(lambda: subprocess.Popen(command, env=dict(env) if env is not None else None,
                                                       start_new_session=True, **popen))


def stop_child(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the guard (it passes it on and waits for the module); past `timeout_s`, SIGKILL to the group."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # a session of its own: the group id is the guard's pid
        except ProcessLookupError:
            pass
        process.wait()
