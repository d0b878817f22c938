"""The summary a recipe prints at the end, and the metrics file it writes beside the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def write_summary(output_dir: str | Path, title: str, metrics: dict, paths: dict[str, str]) -> Path:
    """Print a short summary table and write `summary.json` into `output_dir`; return its path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary_path = output_dir / "summary.json"
    record = {"title": title, "metrics": metrics, "paths": {**paths, "summary": str(summary_path)}}
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=float))
    tmp.replace(summary_path)  # atomic: a reader never sees half a file
    width = max([len(k) for k in metrics] + [len(k) for k in record["paths"]] + [8])
    print(f"\n== {title} ==")
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {shown}")
    for key, value in record["paths"].items():
        print(f"  {key:<{width}}  {value}")
    return summary_path
