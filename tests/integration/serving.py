"""Waiting for a real `nlm serve` child process, shared by the whole-process serving tests."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_until_ready(process: subprocess.Popen, base: str, timeout: float = 120) -> None:
    """Return once `base/ping` answers 200; the child's output if it exits first; kill it on `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/ping", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise AssertionError(process.stdout.read())
        time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not become ready")
