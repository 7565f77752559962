"""The peak resident memory of this process, for the benchmarks that run each case in a child process.

`resource.getrusage(RUSAGE_SELF).ru_maxrss` is not that on Linux: the kernel keeps the high-water mark across
`execve`, so a child started by a parent that had loaded a model reports the parent's peak when its own is
lower (measured: a parent at 813 MiB, its fresh child 813 MiB by ru_maxrss, 13 MiB by VmHWM). `VmHWM` in
/proc/self/status is the high-water mark of this process's own address space since exec. macOS has no /proc;
there ru_maxrss (bytes) is the fallback.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_rss_bytes() -> int:
    return int(peak_rss_mib() * 2**20)
