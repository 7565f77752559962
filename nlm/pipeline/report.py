"""output_dir/pipeline_report.json and .md: per agent its status, error line, eval metrics, wall time and folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_teacher_agreement")


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    agents = report["agents"]
    shown = [c for c in COLUMNS if any(c in a["metrics"] for a in agents)]
    lines = [f"# Pipeline report: {report['pipeline']}", "",
             f"{len(agents)} agent(s), {report['failed']} failed, {report['wall_seconds']:.1f}s in all. "
             f"Output: `{report['output_dir']}`", "",
             "| agent | status | " + " | ".join(shown) + (" | " if shown else "") + "wall time (s) | model | error |",
             "|---|---|" + "---|" * len(shown) + "---|---|---|"]
    for agent in agents:
        figures = " | ".join(_figure(agent["metrics"].get(c)) for c in shown)
        error = (agent["error"] or "").replace("|", "\\|")
        lines.append(f"| {agent['name']} | {agent['status']} | {figures}{' | ' if shown else ''}"
                     f"{agent['wall_seconds']:.1f} | `{agent['final_dir'] or agent['output_dir']}` | {error} |")
    shared = [s for s in report["shared"] if len(s["agents"]) > 1 or s["kind"] == "teacher_cache"]
    if shared:
        lines += ["", "Shared work (built once, same fingerprint):", ""]
        for item in shared:
            what = "tokenised data" if item["kind"] == "tokenized" else f"teacher cache `{item['path']}` ({item['status']})"
            lines.append(f"- {what}: {', '.join(item['agents'])}")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "pipeline_report.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    output_dir.joinpath("pipeline_report.md").write_text(render_markdown(report), encoding="utf-8")
    return path
