"""Experiment trackers (`report_to`): which exist, whether each is installed and usable, checked at config time.

The trackers themselves are the transformers integrations (TensorBoardCallback, WandbCallback, MLflowCallback);
this module only makes a missing package or missing credentials a configuration error naming the exact fix,
before any model is loaded (the library would otherwise fail after loading, with a message about tensorboardX).
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path

# name -> (module that must import, pip requirement). The extra `nlm[track]` installs all of them.
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard>=2.15"),
    "wandb": (("wandb",), "wandb>=0.17"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow-skinny>=2.16 sqlalchemy>=2.0 alembic>=1.13"),
}


def install_command(name: str) -> str:
    return f"pip install {TRACKERS[name][1]}   (or: pip install -e '.[track]' in the nlm checkout)"


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc"))).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_trackers(names: list[str]) -> list[str]:
    """`names` unchanged when every tracker is known, installed and usable; else ValueError naming the fix."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}: expected tensorboard, wandb, mlflow or none")
        modules, _ = TRACKERS[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"{name} is not installed (missing {', '.join(missing)}): run `{install_command(name)}`")
        if name == "wandb" and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun") \
                and not _wandb_has_credentials():
            raise ValueError("wandb has no credentials: run `wandb login`, set WANDB_API_KEY, "
                             "or set WANDB_MODE=offline to log locally (sync later with `wandb sync`)")
    return names
