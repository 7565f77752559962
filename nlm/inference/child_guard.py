"""Run a Python module as a child that cannot outlive the process that started it.

    python child_guard.py PARENT_PID MODULE [ARG ...]

Run by path in any Python (vLLM's own venv need not have nlm): standard library only. This guard runs
`python -m MODULE ARG ...` as its child, in the guard's own session (the starter gives it one), and waits.
It stops that child, then its whole process group (vLLM's engine-core processes too), when:

- the starter dies, even by SIGKILL: on Linux the kernel sends the guard SIGUSR1 (`PR_SET_PDEATHSIG`; it fires
  when the *thread* that started the guard ends, so nlm starts it from a thread that lasts as long as nlm,
  `nlm.inference.child`); everywhere, the guard also sees its parent pid change (polled every 0.5 s);
- it gets SIGTERM or SIGINT: passed on to the child once, then waited for (the starter escalates to SIGKILL).

The guard exits with the child's status. On a parent's death the child has GRACE_S to stop before the group is
killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

GRACE_S = 10.0
POLL_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _ask_parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _own_group() -> bool:
    """The guard leads its own process group: signalling the group can never reach the starter."""
    return os.getpgrp() == os.getpid()


def _kill_group(signum: int) -> None:
    if _own_group():
        try:
            os.killpg(os.getpgrp(), signum)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: child_guard.py PARENT_PID MODULE [ARG ...]", file=sys.stderr)
        return 2
    parent, module, args = int(argv[1]), argv[2], argv[3:]
    orphaned, stop = threading.Event(), threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: orphaned.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _ask_parent_death_signal(signal.SIGUSR1)
    if os.getppid() != parent:  # the starter died before the guard could watch it
        return 1
    child = subprocess.Popen([sys.executable, "-m", module, *args])
    forwarded = False
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if orphaned.is_set() or os.getppid() != parent:
            print(f"child_guard: the process that started {module} (pid {parent}) is gone; stopping it", file=sys.stderr)
            child.send_signal(signal.SIGTERM)
            try:
                code = child.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_group(signal.SIGKILL)  # the guard too
                code = child.wait()
            break
        if stop.is_set() and not forwarded:
            child.send_signal(signal.SIGTERM)
            forwarded = True
    # What the child left in the group (processes it started and did not stop): SIGTERM, the guard excepted.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _kill_group(signal.SIGTERM)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
