"""Print a Markdown table of per-step losses of several runs side by side (one column per run).

    python bench/loss_table.py RUNS_DIR      # RUNS_DIR/<name>/metrics.jsonl and run.json
"""

import json
import sys
from pathlib import Path


def main(root: str, steps=(1, 2, 5, 10, 15, 20)) -> None:
    runs = {}
    for run in sorted(Path(root).iterdir()):
        metrics = run / "metrics.jsonl"
        if not metrics.exists():
            continue
        by_step = {}
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                by_step[rec["step"]] = rec
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
        runs[run.name] = (by_step, info)
    names = list(runs)
    print("| step | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for step in steps:
        cells = [f"{runs[n][0][step]['loss']:.4f}" if step in runs[n][0] else "-" for n in names]
        print(f"| {step} | " + " | ".join(cells) + " |")
    skipped = [str(sum(r.get("skipped", False) for r in runs[n][0].values())) for n in names]
    print("| skipped steps | " + " | ".join(skipped) + " |")
    print("| backend/precision | " + " | ".join(f"{runs[n][1].get('backend', '?')}/{runs[n][1].get('precision', '?')}" for n in names) + " |")
    print("| adapter saved | " + " | ".join("yes" if runs[n][1].get("adapter_dir") else "no" for n in names) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
