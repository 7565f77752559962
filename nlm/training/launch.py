"""Run `nlm train` as a child process — one process, or one per device through torchrun — and keep its
one-line failure reason. The SageMaker `train` entry point and `nlm pipeline run` both launch runs this way,
so every run they start is exactly an `nlm train` run (same code, same folders, same metadata)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# What `nlm` prints for a user error and for an unexpected one (see nlm.cli.main).
ERROR_PREFIXES = ("nlm: error:", "nlm: internal error:")


@dataclass(frozen=True)
class Topology:
    """How many processes train together: per node (one per GPU) and over how many nodes."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500


def train_command(train_args: Sequence[str], topology: Topology = Topology()) -> list[str]:
    """`python -m nlm.cli train ARGS`, or the torchrun line that starts one such process per device."""
    module = ["-m", "nlm.cli", "train", *train_args]
    if topology.nproc_per_node <= 1 and topology.nnodes <= 1:
        return [sys.executable, *module]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(topology.nproc_per_node)]
    if topology.nnodes > 1:
        launcher += ["--nnodes", str(topology.nnodes), "--node_rank", str(topology.node_rank),
                     "--master_addr", str(topology.master_addr), "--master_port", str(topology.master_port)]
    else:
        launcher += ["--standalone"]  # a free port on loopback: several jobs can run side by side
    return [*launcher, *module]


def error_line(lines: Sequence[str], returncode: int) -> str:
    """The child's own one-line error when it printed one, else its last line and exit code."""
    for line in reversed(lines):
        stripped = line.strip()
        for prefix in ERROR_PREFIXES:
            if prefix in stripped:
                return stripped[stripped.index(prefix) + len("nlm: "):].strip()
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return f"training exited with code {returncode}" + (f": {last[-300:]}" if last else "")


def run_logged(command: Sequence[str], env: Mapping[str, str], log_path: Path | None = None,
               echo: bool = False, keep_lines: int = 200,
               on_line: Callable[[str], bool] | None = None) -> tuple[int, str | None]:
    """Run `command`, writing its stdout and stderr to `log_path` (and to our stderr when `echo`).

    `on_line` sees every line as it arrives; when it returns True the child is stopped (`nlm tune` prunes a
    trial this way). Returns the exit code and, on failure, the one-line reason.
    """
    tail: list[str] = []
    log = open(log_path, "a", encoding="utf-8") if log_path is not None else None  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", bufsize=1)
        assert process.stdout is not None
        try:
            for line in process.stdout:
                if log is not None:
                    log.write(line)
                    log.flush()
                if echo:
                    sys.stderr.write(line)
                tail.append(line)
                del tail[:-keep_lines]
                if on_line is not None and on_line(line):
                    _stop(process)
                    break
            returncode = process.wait()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM turned into an exception): stop the child too, then re-raise.
            _stop(process)
            raise
    finally:
        if log is not None:
            log.close()
    return returncode, (None if returncode == 0 else error_line(tail, returncode))


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def child_environment(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment plus `extra`; the child finds `nlm` the way we were started (same interpreter)."""
    env = dict(os.environ if base is None else base)
    env.update(extra or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
