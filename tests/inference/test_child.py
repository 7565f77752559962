"""Managed children (nlm.inference.child) with real processes: a stand-in for vLLM's server that, like vLLM,
starts a process of its own; started, as nlm starts vLLM, from a thread that ends once it has started it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and signals: POSIX")

ROOT = Path(__file__).resolve().parents[2]

STANDIN = '''
import subprocess, sys, time
from pathlib import Path

worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like vLLM's engine core
Path(sys.argv[1]).write_text(f"{__import__('os').getpid()} {worker.pid}")
time.sleep(600)
'''

STARTER = '''
import sys, threading, time
from nlm.inference.child import start_child

started = {}
loader = threading.Thread(target=lambda: started.update(p=start_child(sys.executable, "standin", [sys.argv[1]])))
loader.start()
loader.join()  # the thread that asked for the child has ended, as nlm's model-loading thread does
print(started["p"].pid, flush=True)
if sys.argv[2] == "stop":
    from pathlib import Path

    from nlm.inference.child import stop_child

    while not (Path(sys.argv[1]).is_file() and Path(sys.argv[1]).read_text()):  # the stand-in and its worker run
        time.sleep(0.1)

    stop_child(started["p"], timeout_s=30)
    print("stopped", started["p"].returncode, flush=True)
time.sleep(600)
'''


def _alive(pid: int) -> bool:
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text() if Path("/proc").is_dir() else _signal0(pid)
    except FileNotFoundError:
        return False


def _signal0(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(pids: list[int], timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if _alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
    return [pid for pid in pids if _alive(pid)]


@pytest.fixture
def starter(tmp_path):
    (tmp_path / "standin.py").write_text(STANDIN)
    script = tmp_path / "starter.py"
    script.write_text(textwrap.dedent(STARTER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    processes = []

    def start(mode: str) -> tuple[subprocess.Popen, int, int, int]:
        pids = tmp_path / f"pids-{mode}"
        process = subprocess.Popen([sys.executable, str(script), str(pids), mode], stdout=subprocess.PIPE, text=True, env=env)
        processes.append(process)
        guard = int(process.stdout.readline())
        deadline = time.monotonic() + 60
        while not (pids.is_file() and pids.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        module, worker = map(int, pids.read_text().split())
        return process, guard, module, worker

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_sigkilled_starter_takes_the_child_and_everything_it_started_down(starter):
    process, guard, module, worker = starter("sleep")
    time.sleep(2)  # four watchdog polls: the child outlives the thread that started it, as it must
    assert all(_alive(pid) for pid in (guard, module, worker))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _wait_gone([guard, module, worker]) == []


def test_stop_child_stops_the_module_and_its_group_and_reports_the_status(starter):
    process, guard, module, worker = starter("stop")
    assert process.stdout.readline().split()[0] == "stopped"
    assert _wait_gone([guard, module, worker]) == []
    assert process.poll() is None  # the starter itself was never signalled (the child has a group of its own)


def test_the_guard_refuses_to_start_when_its_starter_is_already_gone(tmp_path):
    guard = ROOT / "nlm/inference/child_guard.py"
    reply = subprocess.run([sys.executable, str(guard), "1", "standin", "x"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert reply.returncode == 1 and not (tmp_path / "x").exists()
