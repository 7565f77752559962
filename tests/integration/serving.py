"""Starting, waiting for and stopping real server child processes (`nlm serve`, vLLM), shared by the whole-process
serving tests."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

import httpx


@dataclass
class Server:
    process: subprocess.Popen
    base: str  # http://127.0.0.1:PORT
    lines: list[str]  # the child's stdout and stderr, read as they come (the pipe must not fill up)
    reader: threading.Thread  # join it once the child has exited to have all of `lines`


def wait_until_ready(process: subprocess.Popen, base: str, timeout: float = 120, health: str = "/ping",
                     lines: list[str] | None = None) -> None:
    """Return once `base + health` answers 200; if the child exits first, fail with its output (the last lines
    of `lines` when a reader collects it, else its stdout); on `timeout`, kill it and fail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}{health}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise AssertionError("".join(lines[-60:]) if lines is not None else process.stdout.read())
        time.sleep(0.2)
    process.kill()
    tail = "\n" + "".join(lines[-60:]) if lines else ""
    raise AssertionError(f"server did not become ready in {timeout:g} s{tail}")


def start_server(command: list[str], port: int, env: dict[str, str], health: str = "/ping",
                 timeout: float = 1500) -> Server:
    """Run `command` (a server on loopback `port`), its output read into `Server.lines`; return once it is ready."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    server = Server(process, f"http://127.0.0.1:{port}", lines, reader)
    wait_until_ready(process, server.base, timeout, health, lines)
    return server


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM (`nlm serve --engine vllm` then stops its vLLM child; a SIGKILL would orphan it); SIGKILL past 60 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
