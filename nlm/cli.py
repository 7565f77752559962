"""The `nlm` command: parse, call one function, turn user errors into one line and an exit code.

Exit codes: 0 success, 1 runtime failure (model, data, training), 2 usage or configuration error,
130 interrupted. `--debug` shows tracebacks; `--log_format json` makes every log line a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nlm.config import flags
from nlm.errors import ConfigError, NlmError

logger = logging.getLogger("nlm")

GLOBAL_FLAGS = {"--debug": 0, "--log_format": 1, "--log_level": 1}


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (exit 2, one line) instead of printing usage and exiting itself."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("nlm").strip()
        raise ConfigError(f"{where}: {message}" if where else message)


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


def _config_options_help() -> str:
    from nlm.config.sources import known_keys

    lines = ["configuration options (CLI > NLM_* environment > --config YAML > default):"]
    for key, field in known_keys().items():
        default = field.get_default(call_default_factory=True)
        shown = repr(default) if isinstance(default, str) else default
        lines.append(f"  --{key:<32} {field.description or ''} [default: {shown}]")
    return "\n".join(lines)


def _load(config_file: str | None, rest: Sequence[str]) -> Any:
    from nlm.config.sources import load_config

    return load_config(rest, config_file)


# --- commands ---------------------------------------------------------------------------------------


def cmd_train(ns: argparse.Namespace, rest: list[str], options: dict[str, Any]) -> int:
    from nlm.training.run import train

    loaded = _load(ns.config, rest)
    _register_config_secrets(loaded.config)
    result = train(loaded.config, log_format=options["log_format"])
    print(f"final model: {result.final_dir}")
    return 0


def cmd_config_show(ns: argparse.Namespace, rest: list[str], options: dict[str, Any]) -> int:
    import yaml

    loaded = _load(ns.config, rest)
    _register_config_secrets(loaded.config)
    document = loaded.config.model_dump(mode="json")
    print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True).rstrip())
    if ns.sources:
        print("# sources")
        width = max(len(k) for k in loaded.sources)
        for key, source in loaded.sources.items():
            print(f"# {key:<{width}}  {source}")
    return 0


def cmd_data_inspect(ns: argparse.Namespace, rest: list[str], options: dict[str, Any]) -> int:
    from nlm.data.inspect import format_report, inspect_file
    from nlm.data.tokenize import TokenizeSettings

    tokenizer = None
    if ns.tokenizer:
        from nlm.models.loading import load_tokenizer

        tokenizer = load_tokenizer(ns.tokenizer, trust_remote_code=ns.trust_remote_code)
    if ns.config or not ns.file:  # per-source counts of the config's train_mixture (or train_file)
        from nlm.data.inspect import format_sources, inspect_sources
        from nlm.data.mixture import source_specs

        sources = inspect_sources(source_specs(_load(ns.config, rest).config), tokenizer, TokenizeSettings(max_seq_length=ns.max_seq_length))
        print(json.dumps(sources) if ns.json else format_sources(sources))
        return 0
    report = inspect_file(Path(ns.file), tokenizer, TokenizeSettings(max_seq_length=ns.max_seq_length))
    print(json.dumps(report) if ns.json else format_report(Path(ns.file), report))
    return 0


def cmd_eval(ns: argparse.Namespace, rest: list[str], options: dict[str, Any]) -> int:
    from nlm.data.tokenize import TokenizeSettings
    from nlm.models.model_info import prompt_separator
    from nlm.training.evaluate import evaluate_model

    result = evaluate_model(
        ns.model, Path(ns.data), teacher_path=ns.teacher, batch_size=ns.batch_size,
        settings=TokenizeSettings(max_seq_length=ns.max_seq_length, prompt_separator=prompt_separator(ns.model)),
        device=ns.device,
        trust_remote_code=ns.trust_remote_code, allow_pickle=ns.allow_pickle, exact_match=ns.exact_match,
    )
    if ns.json:
        print(json.dumps(result))
    else:
        for key in ("loss", "perplexity", "token_accuracy", "exact_match", "teacher_kl", "teacher_agreement", "tokens", "examples"):
            if key in result:
                value = result[key]
                print(f"{key:<18} {value:.4f}" if isinstance(value, float) else f"{key:<18} {value}")
    return 0


def cmd_generate(ns: argparse.Namespace, rest: list[str], options: dict[str, Any]) -> int:
    from nlm.models.device import select_device
    from nlm.models.generation import GenerationSettings, generate_texts
    from nlm.models.loading import load_tokenizer, load_trained_model
    from nlm.models.model_info import prompt_separator

    device = select_device(forced=ns.device) if ns.device else select_device()
    tokenizer = load_tokenizer(ns.model, trust_remote_code=ns.trust_remote_code)
    model = load_trained_model(ns.model, device=device, trust_remote_code=ns.trust_remote_code, allow_pickle=ns.allow_pickle)
    settings = GenerationSettings(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, seed=ns.seed)
    prompt = ns.prompt if ns.raw else ns.prompt + prompt_separator(ns.model)
    for text in generate_texts(model, tokenizer, [prompt], settings)[0]:
        print(text)
    return 0


def cmd_teacher_cache(ns: argparse.Namespace, rest: list[str], options: dict[str, Any]) -> int:
    from nlm.distill.cache_builder import build_teacher_cache

    if ns.teacher:
        rest = [*rest, "--teacher_model", ns.teacher]
    loaded = _load(ns.config, rest)
    _register_config_secrets(loaded.config)
    manifest = build_teacher_cache(loaded.config, Path(ns.output), top_k=ns.top_k, batch_size=ns.batch_size,
                                   shard_examples=ns.shard_examples, overwrite=loaded.config.overwrite)
    print(f"teacher cache: {ns.output} ({manifest['tokens']} tokens, {manifest['bytes_per_token']} bytes per token)")
    return 0


def cmd_demo(ns: argparse.Namespace, rest: list[str], options: dict[str, Any]) -> int:
    from nlm.demo.pipeline import run_demo

    run_demo(Path(ns.output_dir), seed=ns.seed, quick=ns.quick, overwrite=ns.overwrite, data_only=ns.data_only,
             log_format=options["log_format"])
    return 0


def cmd_serve(ns: argparse.Namespace, rest: list[str], options: dict[str, Any]) -> int:
    import os

    from nlm.config.logging_setup import register_secret
    from nlm.inference.server import serve
    from nlm.inference.settings import ServerSettings

    api_key = None
    if ns.api_key_env:
        api_key = os.environ.get(ns.api_key_env)
        if not api_key:
            raise ConfigError(f"--api_key_env {ns.api_key_env}: that environment variable is not set or empty")
        register_secret(api_key)
    serve(ServerSettings(
        model=Path(ns.model), host=ns.host, port=ns.port, served_model_name=ns.served_model_name, api_key=api_key,
        max_batch_size=ns.max_batch_size, batch_window_ms=ns.batch_window_ms,
        max_concurrent_requests=ns.max_concurrent_requests, request_timeout_s=ns.request_timeout,
        max_body_bytes=ns.max_body_bytes, max_new_tokens_cap=ns.max_new_tokens_cap,
        default_max_new_tokens=ns.default_max_new_tokens, max_return_sequences=ns.max_return_sequences,
        max_prompt_chars=ns.max_prompt_chars, max_prompt_tokens=ns.max_prompt_tokens,
        prompt_separator=ns.prompt_separator, device=ns.device, trust_remote_code=ns.trust_remote_code,
        allow_pickle=ns.allow_pickle, graceful_shutdown_s=ns.graceful_shutdown,
    ))
    return 0


# --- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nlm",
        description="Knowledge distillation for causal language models.",
        epilog="global flags (anywhere): --debug (tracebacks, DEBUG logs), --log_format text|json, --log_level LEVEL",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = commands.add_parser(
        "train", help="distil a teacher into a student", epilog=_config_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", metavar="FILE", help="YAML file of options")
    train.set_defaults(handler=cmd_train, takes_config_flags=True)

    config = commands.add_parser("config", help="show the effective configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", parser_class=_Parser)
    show = config_commands.add_parser(
        "show", help="print the effective configuration as YAML (secrets hidden)", epilog=_config_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("--config", metavar="FILE", help="YAML file of options")
    show.add_argument("--sources", action="store_true", help="also print where each value came from")
    show.set_defaults(handler=cmd_config_show, takes_config_flags=True)

    data = commands.add_parser("data", help="look at data files")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=_Parser)
    inspect = data_commands.add_parser("inspect", help="count records, formats, skipped lines and token lengths")
    inspect.add_argument("file", nargs="?", help="a JSONL file (or --config for per-source counts of a mixture)")
    inspect.add_argument("--config", help="a training config: counts per source of its train_mixture")
    inspect.add_argument("--tokenizer", help="tokenizer (hub id or folder) for token-length statistics")
    inspect.add_argument("--max_seq_length", type=flags.positive_int, default=512)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--trust_remote_code", action="store_true")
    inspect.set_defaults(handler=cmd_data_inspect)

    evaluate = commands.add_parser("eval", help="score a model on a JSONL file")
    evaluate.add_argument("--model", required=True, help="a trained model folder (full or LoRA adapter) or hub id")
    evaluate.add_argument("--data", required=True, help="JSONL file to score")
    evaluate.add_argument("--teacher", help="also report KL to and top-1 agreement with this teacher")
    evaluate.add_argument("--batch_size", type=flags.positive_int, default=8)
    evaluate.add_argument("--max_seq_length", type=flags.positive_int, default=512)
    evaluate.add_argument("--device", choices=["cuda", "mps", "cpu"])
    evaluate.add_argument("--exact_match", action="store_true",
                          help="also generate greedily for each prompt/completion record and count exact matches")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--trust_remote_code", action="store_true")
    evaluate.add_argument("--allow_pickle", action="store_true", help="accept .bin (pickle) weights")
    evaluate.set_defaults(handler=cmd_eval)

    generate = commands.add_parser("generate", help="generate a completion for one prompt")
    generate.add_argument("--model", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max_new_tokens", type=flags.positive_int, default=64)
    generate.add_argument("--temperature", type=flags.temperature, default=0.0, help="0 is greedy")
    generate.add_argument("--seed", type=flags.non_negative_int)
    generate.add_argument("--raw", action="store_true", help="do not append the training prompt separator")
    generate.add_argument("--device", choices=["cuda", "mps", "cpu"])
    generate.add_argument("--trust_remote_code", action="store_true")
    generate.add_argument("--allow_pickle", action="store_true")
    generate.set_defaults(handler=cmd_generate)

    cache = commands.add_parser(
        "teacher-cache", help="run the teacher once over the training data and store its top-k targets",
        epilog=_config_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cache.add_argument("--config", metavar="FILE", help="the YAML file the training run will use")
    cache.add_argument("--teacher", help="teacher model (same as --teacher_model)")
    cache.add_argument("--output", required=True, help="cache folder")
    cache.add_argument("--top_k", type=flags.positive_int, default=64, help="teacher tokens kept per position")
    cache.add_argument("--batch_size", type=flags.positive_int, default=8, help="sequences per teacher forward")
    cache.add_argument("--shard_examples", type=flags.positive_int, default=1024, help="examples per shard (resume unit)")
    cache.set_defaults(handler=cmd_teacher_cache, takes_config_flags=True)

    serve = commands.add_parser("serve", help="serve a trained model over HTTP (SageMaker and OpenAI-compatible)")
    serve.add_argument("--model", default="/opt/ml/model", help="model folder (full, merged or LoRA adapter)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server to the network")
    serve.add_argument("--port", type=flags.positive_int, default=8080)
    serve.add_argument("--api_key_env", metavar="NAME", help="require 'Authorization: Bearer $NAME' on every route but /ping")
    serve.add_argument("--served_model_name", help="model id shown by /v1/models (default: the folder name)")
    serve.add_argument("--max_batch_size", type=flags.positive_int, default=8, help="requests sharing one generate call")
    serve.add_argument("--batch_window_ms", type=flags.non_negative_float, default=10.0, help="how long the batcher waits for company")
    serve.add_argument("--max_concurrent_requests", type=flags.positive_int, default=64, help="beyond this: 429 at once")
    serve.add_argument("--request_timeout", type=flags.positive_float, default=60.0, help="seconds before a 504")
    serve.add_argument("--max_body_bytes", type=flags.positive_int, default=1024 * 1024)
    serve.add_argument("--max_new_tokens_cap", type=flags.positive_int, default=512)
    serve.add_argument("--default_max_new_tokens", type=flags.positive_int, default=64)
    serve.add_argument("--max_return_sequences", type=flags.positive_int, default=4)
    serve.add_argument("--max_prompt_chars", type=flags.positive_int, default=32_000)
    serve.add_argument("--max_prompt_tokens", type=flags.positive_int, default=2048)
    serve.add_argument("--prompt_separator", help="appended to /invocations prompts (default: the model's training separator)")
    serve.add_argument("--graceful_shutdown", type=flags.positive_float, default=30.0, help="seconds to finish in-flight requests")
    serve.add_argument("--device", choices=["cuda", "mps", "cpu"])
    serve.add_argument("--trust_remote_code", action="store_true")
    serve.add_argument("--allow_pickle", action="store_true", help="accept .bin (pickle) weights")
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser("demo", help="distil a teacher into a student on a built-in task and compare with fine-tuning")
    demo.add_argument("--output_dir", default="outputs/demo")
    demo.add_argument("--seed", type=flags.non_negative_int, default=0)
    demo.add_argument("--quick", action="store_true", help="fewer steps and smaller models (same code)")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo in output_dir")
    demo.add_argument("--data-only", "--data_only", dest="data_only", action="store_true",
                      help="only write the data set and tokenizer")
    demo.set_defaults(handler=cmd_demo)
    return parser


def _register_config_secrets(config: Any) -> None:
    from nlm.config.logging_setup import register_secret

    if config.hf_token is not None:
        register_secret(config.hf_token.get_secret_value())


def run(argv: Sequence[str]) -> int:
    """Parse and run; raises NlmError for user errors (main() turns them into exit codes)."""
    from nlm.config.logging_setup import setup_logging
    from nlm.config.sources import environment_secrets

    options, args = _split_global(argv)
    setup_logging(options["log_level"], options["log_format"], secrets=environment_secrets())
    parser = build_parser()
    ns, rest = parser.parse_known_args(args)
    handler = getattr(ns, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    if rest and not getattr(ns, "takes_config_flags", False):
        raise ConfigError(f"unknown arguments for '{ns.command}': {' '.join(rest)}")
    return handler(ns, rest, options)


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
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
