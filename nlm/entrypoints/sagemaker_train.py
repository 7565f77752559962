"""`train`: the SageMaker training entry point (SageMaker runs `docker run IMAGE train`).

Reads the job's hyperparameters and channels, runs `nlm train` (one process per GPU through torchrun),
writes the model to SM_MODEL_DIR, and on failure the one-line reason to SM_OUTPUT_DIR/failure with a
non-zero exit. See docs/SAGEMAKER.md.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from nlm.apps.sagemaker import DEFAULT_ROOT, ROOT_ENV, run_training_job, write_failure
    from nlm.config.logging_setup import setup_logging
    from nlm.config.sources import environment_secrets
    from nlm.errors import ConfigError, NlmError

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["train"]:
        args = args[1:]
    debug = "--debug" in args
    setup_logging("DEBUG" if debug else "INFO", "text", secrets=environment_secrets())
    output_dir = Path(os.environ.get("SM_OUTPUT_DIR") or Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT) / "output")
    try:
        unknown = [a for a in args if a != "--debug"]
        if unknown:
            raise ConfigError(f"train: unexpected arguments {' '.join(unknown)}; options are hyperparameters")
        return run_training_job()
    except NlmError as exc:
        if debug:
            raise
        write_failure(output_dir, str(exc))
        print(f"nlm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the job must always leave a reason behind
        write_failure(output_dir, f"internal error: {type(exc).__name__}: {exc}")
        logging.getLogger("nlm").exception("training job failed")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
