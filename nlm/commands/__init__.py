"""One module per `nlm` command. Each has a docstring (its first line is the command's help), an `Options`
pydantic model (its flags, environment variables and YAML keys; see `nlm.commands.options`) and
`run(options) -> int`, which imports heavy libraries inside and calls one library function.
The name -> module table is `COMMANDS` below (here, not in `nlm.cli`, so that `nlm.commands.reference` reads
it without importing the layer above)."""

from __future__ import annotations

import importlib
from types import ModuleType

# The one table of commands: name on the command line -> module. Multi-word names are groups ("data inspect").
COMMANDS: dict[str, str] = {
    "train": "nlm.commands.train",
    "eval": "nlm.commands.evaluate",
    "generate": "nlm.commands.generate",
    "teacher-cache": "nlm.commands.teacher_cache",
    "teacher-generate": "nlm.commands.teacher_generate",
    "init-student": "nlm.commands.init_student",
    "serve": "nlm.commands.serve",
    "demo": "nlm.commands.demo",
    "config show": "nlm.commands.config_show",
    "data inspect": "nlm.commands.data_inspect",
    "data mix": "nlm.commands.data_mix",
    "data select": "nlm.commands.data_select",
    "pipeline run": "nlm.commands.pipeline_run",
    "tune": "nlm.commands.tune",
    "export": "nlm.commands.export",
    "publish": "nlm.commands.publish",
    "report": "nlm.commands.report",
}


def load_command(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def command_summary(module: ModuleType) -> str:
    return (module.__doc__ or "").strip().splitlines()[0].rstrip(".")

