"""The `nlm` command: global flags, dispatch to one module per command, user errors -> one line and an exit code.

Exit codes: 0 success, 1 runtime failure (model, data, training), 2 usage or configuration error,
130 interrupted. `--debug` shows tracebacks; `--log_format json` makes every log line a JSON object.
Each command lives in `nlm/commands/<module>.py` (its docstring, `Options` model and `run`); see
docs/ARCHITECTURE.md, "Adding a command". Modules are imported only when their command runs (or for help).
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from nlm.commands import COMMANDS, command_summary, load_command
from nlm.errors import ConfigError, NlmError

GLOBAL_FLAGS = {"--debug": 0, "--log_format": 1, "--log_level": 1}
GLOBAL_HELP = "global flags (anywhere): --debug (tracebacks, DEBUG logs), --log_format text|json, --log_level LEVEL"


def _split_global(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Global flags may appear anywhere on the line; take them out before the command's own parsing."""
    options: dict[str, Any] = {"debug": False, "log_format": "text", "log_level": "INFO"}
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in GLOBAL_FLAGS:
            if GLOBAL_FLAGS[name] == 0:
                options["debug"] = True
            else:
                if not eq:
                    if i + 1 >= len(args):
                        raise ConfigError(f"{name} needs a value")
                    value = args[i + 1]
                    i += 1
                options[name[2:]] = value
        else:
            rest.append(args[i])
        i += 1
    if options["log_format"] not in ("text", "json"):
        raise ConfigError(f"--log_format {options['log_format']!r}: expected text or json")
    options["log_level"] = str(options["log_level"]).upper()
    if options["log_level"] not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log_level {options['log_level']!r}: expected DEBUG, INFO, WARNING or ERROR")
    if options["debug"]:
        options["log_level"] = "DEBUG"
    return options, rest


def _find_command(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The longest command name at the start of `args` (`data inspect` before `data`), and what follows it."""
    for words in (2, 1):
        name = " ".join(args[:words])
        if len(args) >= words and name in COMMANDS:
            return name, list(args[words:])
    return None, list(args)


def _help(prefix: str = "") -> str:
    """The command list (all of them, or those of one group such as `data`)."""
    lines = ["usage: nlm [global flags] COMMAND [options]   (nlm COMMAND --help for its options)", ""]
    if not prefix:
        lines += ["Knowledge distillation for causal language models.", ""]
    lines.append("commands:")
    names = [n for n in COMMANDS if n.startswith(prefix)]
    width = max(len(n) for n in names)
    lines += [f"  {name:<{width}}  {command_summary(load_command(name))}" for name in names]
    return "\n".join([*lines, "", GLOBAL_HELP])


def _training_options_help() -> str:
    from nlm.config.view import options_help

    return options_help()


def _parse(name: str, module: ModuleType, args: list[str]) -> Any:
    from nlm.commands.options import build_parser, option_specs, parse_options

    doc = (module.__doc__ or "").strip()
    takes_training_flags = any(s.training_flags for s in option_specs(module.Options))
    epilog = "\n\n".join(part for part in (
        _training_options_help() if takes_training_flags and ("-h" in args or "--help" in args) else "", GLOBAL_HELP,
    ) if part)
    parser = build_parser(name, module.Options, description=doc, epilog=epilog)
    return parse_options(name, module.Options, args, parser=parser)


def run(argv: Sequence[str]) -> int:
    """Parse and run; raises NlmError for user errors (main() turns them into exit codes)."""
    from nlm.config.logging_setup import setup_logging
    from nlm.config.sources import environment_secrets

    options, args = _split_global(argv)
    setup_logging(options["log_level"], options["log_format"], secrets=environment_secrets())
    name, rest = _find_command(args)
    if name is None:
        if not args or args[0] in ("-h", "--help"):
            print(_help())
            return 0 if args else 2
        group = args[0] + " "
        if any(n.startswith(group) for n in COMMANDS) and (len(args) == 1 or args[1] in ("-h", "--help")):
            print(_help(group))
            return 0 if len(args) > 1 else 2
        words = " ".join(args[:2]) if any(n.startswith(group) for n in COMMANDS) else args[0]
        close = difflib.get_close_matches(words, list(COMMANDS), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown command '{words}'{hint}; `nlm --help` lists the commands")
    module = load_command(name)
    try:
        parsed = _parse(name, module, rest)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    return int(module.run(parsed) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        code = run(argv)
    except NlmError as exc:
        if debug:
            raise
        from nlm.config.logging_setup import redact

        print(f"nlm: error: {redact(str(exc))}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("nlm: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a secret
        if debug:
            raise
        from nlm.config.logging_setup import redact

        print(f"nlm: internal error: {type(exc).__name__}: {redact(str(exc))} (rerun with --debug for the traceback)",
              file=sys.stderr)
        code = 1
    _close_process_group()
    _summarise_hidden_warnings()
    return code


def _close_process_group() -> None:
    """Tear down the process group a distributed run (torchrun, accelerate launch) started, before exit: left to
    the interpreter's shutdown, gloo's threads can abort a finished worker ("terminate called without an active
    exception", SIGABRT) after the run itself succeeded."""
    torch = sys.modules.get("torch")  # never imported just for this
    distributed = getattr(torch, "distributed", None)
    try:
        if distributed is not None and distributed.is_available() and distributed.is_initialized():
            distributed.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - the run's own outcome stands; a teardown failure is only logged
        logging.getLogger("nlm").debug("process group teardown failed: %s", exc)


def _summarise_hidden_warnings() -> None:
    from nlm.config.logging_setup import hidden_warnings

    count = sum(hidden_warnings.values())
    if count and logging.getLogger().isEnabledFor(logging.INFO) and not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("nlm").info("%d warning%s from libraries hidden (--log_level DEBUG shows them)",
                                      count, "" if count == 1 else "s")
    hidden_warnings.clear()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
