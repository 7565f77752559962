"""`serve`: the SageMaker bring-your-own-container entry point.

SageMaker starts the container as `docker run IMAGE serve`; the model is mounted at /opt/ml/model and the
container must answer on port 8080 on every interface. Options can still be passed as `nlm serve` flags.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from nlm.cli import main as nlm_main

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        args = args[1:]
    defaults = ["--host", "0.0.0.0", "--port", os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")]
    return nlm_main(["serve", *defaults, *args])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
