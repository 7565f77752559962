"""Start-up time of the `nlm` command: this tree against another checkout (e.g. `main` before issue 10).

Each case runs `python -m nlm.cli ...` in a fresh process, alternating between the two trees so both see the
same machine load, and reports the median wall time and whether torch/transformers were imported.

    git archive main | (mkdir -p /tmp/nlm-before && tar -x -C /tmp/nlm-before)
    .venv/bin/python bench/cli_startup.py --before /tmp/nlm-before [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CASES = {
    "nlm --help": ["--help"],
    "nlm config show": ["config", "show"],
    "nlm serve --help": ["serve", "--help"],
    "usage error (eval --batch_size 0)": ["eval", "--model", "m", "--data", "d", "--batch_size", "0"],
}
# Runs the command in-process, then reports which heavy modules it imported (on stderr's last line).
PROBE = (
    "import sys, json, contextlib, io\n"
    "from nlm.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try:\n"
    "        main(sys.argv[1:])\n"
    "    except SystemExit:\n"
    "        pass\n"
    "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules)),"
    " file=sys.stderr)\n"
)


def _run(tree: Path, args: list[str]) -> tuple[float, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=tree)
    seconds = time.perf_counter() - start
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "[]"
    try:
        heavy = json.loads(last)
    except json.JSONDecodeError:
        heavy = ["?"]
    return seconds, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout to compare with (e.g. main before issue 10)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    trees = {"after": HERE} | ({"before": args.before.resolve()} if args.before else {})
    results: dict[str, dict[str, dict]] = {}
    for case, argv in CASES.items():
        times: dict[str, list[float]] = {name: [] for name in trees}
        heavy: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            for name, tree in trees.items():  # alternate, so load spikes hit both sides alike
                seconds, imported = _run(tree, argv)
                times[name].append(seconds)
                heavy[name] = imported
        results[case] = {
            name: {"median_s": round(statistics.median(times[name]), 3), "min_s": round(min(times[name]), 3),
                   "heavy_imports": heavy[name]}
            for name in trees
        }
    print(json.dumps({"python": sys.version.split()[0], "repeats": args.repeats, "results": results}))


if __name__ == "__main__":
    main()
