"""Where nlm may write: never into system directories, and only inside the run's output directory."""

from __future__ import annotations

from pathlib import Path

from nlm.errors import UnsafePathError

# Writing below these would damage the machine; nlm refuses them whatever the user's rights.
SYSTEM_DIRECTORIES = (
    "/etc", "/sys", "/proc", "/root", "/boot", "/dev", "/bin", "/sbin", "/usr", "/lib", "/lib64", "/var/lib",
)  # fmt: skip


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def safe_output_dir(path: Path | str) -> Path:
    """Resolve `path` (symlinks and `..` included) and refuse it when it lies in a system directory."""
    resolved = Path(path).expanduser().resolve()
    for system_dir in SYSTEM_DIRECTORIES:
        system_path = Path(system_dir)
        # Compare with both the literal and the resolved form: /lib is a link to /usr/lib on many systems.
        if _is_within(resolved, system_path) or _is_within(resolved, system_path.resolve()):
            raise UnsafePathError(
                f"output path {path} resolves to {resolved}, inside the system directory {system_dir}; "
                "choose a folder under your home or project directory"
            )
    return resolved


def path_inside(base: Path, relative: Path | str) -> Path:
    """Join `relative` onto `base` and refuse the result if it escapes `base` (via `..` or a symlink)."""
    root = safe_output_dir(base)
    candidate = (root / relative).resolve()
    if not _is_within(candidate, root):
        raise UnsafePathError(f"refusing to write {relative}: it resolves to {candidate}, outside {root}")
    return candidate
