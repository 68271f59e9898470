"""Compare two runs of the same training: per-step losses and adapter tensors.

    python bench/compare_runs.py STRAIGHT_DIR RESUMED_DIR     # prints one line; exit 1 if they differ
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def main(a: str, b: str) -> int:
    la, lb = losses(Path(a)), losses(Path(b))
    ta = load_file(str(Path(a) / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(Path(b) / "adapter" / "adapter_model.safetensors"))
    same_steps = la.keys() == lb.keys()
    loss_diff = max((abs(la[s] - lb[s]) for s in la if s in lb), default=float("nan"))
    bitwise = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    print(f"{Path(a).name} vs {Path(b).name}: steps equal={same_steps} max |loss diff|={loss_diff:.3g} adapters bitwise equal={bitwise}")
    return 0 if same_steps and loss_diff == 0 and bitwise else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
