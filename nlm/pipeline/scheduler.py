"""Run jobs (child processes) side by side: one per GPU set when GPUs exist, N at a time on the CPU.

Hand-written because the rule is small and specific: a job holds `devices` GPUs (`CUDA_VISIBLE_DEVICES`)
for its lifetime, at most `parallel` jobs run at once, and a failing job never stops the others.
`concurrent.futures` has no notion of a device pool, and a process pool would run jobs inside its workers
rather than as plain `nlm train` processes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nlm.training.launch import child_environment, run_logged

logger = logging.getLogger(__name__)


@dataclass
class Job:
    name: str
    command: Sequence[str] | Callable[[], Sequence[str]]  # a callable is built when the job starts
    devices: int = 1
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Filled in when it ran:
    returncode: int | None = None
    error: str | None = None
    seconds: float = 0.0
    gpus: list[int] = field(default_factory=list)


def visible_gpus() -> list[int]:
    """The CUDA devices this process may hand out (honours an outer CUDA_VISIBLE_DEVICES)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA build means no GPUs to hand out
        return []
    outer = os.environ.get("CUDA_VISIBLE_DEVICES")
    if outer:
        ids = [part.strip() for part in outer.split(",") if part.strip()]
        return [int(i) for i in ids[:count] if i.isdigit()] or list(range(count))
    return list(range(count))


def run_jobs(jobs: Sequence[Job], parallel: int | None = None, gpus: Sequence[int] | None = None) -> list[Job]:
    """Run every job; returns them with their results. `parallel` defaults to one job per GPU, or 1 on CPU."""
    gpus = list(visible_gpus() if gpus is None else gpus)
    limit = parallel or max(1, len(gpus))
    free = list(gpus)
    pending = list(jobs)
    running: dict[str, threading.Thread] = {}
    done: queue.Queue[Job] = queue.Queue()
    threads_per_job = max(1, (os.cpu_count() or 1) // limit)

    for job in pending[:]:
        if gpus and job.devices > len(gpus):
            job.returncode, job.error = 2, f"devices: {job.devices} but only {len(gpus)} GPU(s) are visible"
            pending.remove(job)

    def start(job: Job, assigned: list[int]) -> None:
        extra = dict(job.env)
        if gpus:
            extra["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in assigned)
        elif "OMP_NUM_THREADS" not in os.environ:
            extra["OMP_NUM_THREADS"] = str(threads_per_job)  # N CPU jobs share the cores instead of oversubscribing
        job.gpus = assigned

        def work() -> None:
            began = time.perf_counter()
            try:
                command = job.command() if callable(job.command) else job.command
                job.returncode, job.error = run_logged(command, child_environment(extra), job.log_path)
            except Exception as exc:  # noqa: BLE001 - a job that cannot start fails alone
                job.returncode, job.error = 1, f"could not start: {type(exc).__name__}: {exc}"
            job.seconds = time.perf_counter() - began
            done.put(job)

        thread = threading.Thread(target=work, name=f"nlm-job-{job.name}", daemon=True)
        running[job.name] = thread
        logger.info("%s: started%s", job.name, f" on GPU {extra['CUDA_VISIBLE_DEVICES']}" if gpus else "")
        thread.start()

    while pending or running:
        for job in pending[:]:
            if len(running) >= limit:
                break
            need = job.devices if gpus else 0
            if need <= len(free):
                assigned, free[:] = free[:need], free[need:]
                pending.remove(job)
                start(job, assigned)
        finished = done.get()
        running.pop(finished.name).join()
        free.extend(finished.gpus)
        free.sort()
        if finished.returncode == 0:
            logger.info("%s: finished in %.1fs", finished.name, finished.seconds)
        else:
            logger.error("%s: failed after %.1fs: %s", finished.name, finished.seconds, finished.error)
    return list(jobs)
