"""Predicted vs measured peak GPU memory of real training steps: is ``qwenloop plan`` within 10%?

    python3 bench/plan_vs_measured.py --workdir /tmp/pvm --out bench/results/plan_vs_measured.md
    python3 bench/plan_vs_measured.py --workdir /tmp/pvm --cases tiny:lora:256:ckpt     # CPU smoke (no peak to compare)

Each case is ``shape:method:seq:ckpt|nockpt``: a random-init Qwen2 with the public shape of ``shape``
(``qwenloop.plan.shapes.PRESETS``, or ``tiny``), saved with ``save_pretrained`` and the demo's tokenizer, then
trained for 3 steps by ``qwenloop train`` in a fresh process (micro-batch 1, rows of exactly ``seq``
tokens, LoRA r16 on all 7 projections, bf16, the default target-only head, ``method`` lora or qlora). The
run writes its own plan (``run.json`` ``plan``, made by ``train()`` before the first step) next to its
measured ``torch.cuda.max_memory_allocated`` (``peak_memory_per_rank``): this script only tabulates them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CASES = [
    "qwen2.5-0.5b:lora:512:ckpt", "qwen2.5-0.5b:lora:2048:ckpt", "qwen2.5-0.5b:lora:2048:nockpt",
    "qwen2.5-0.5b:qlora:2048:ckpt", "qwen2.5-1.5b:lora:1024:ckpt", "qwen2.5-1.5b:lora:4096:ckpt",
    "qwen2.5-1.5b:lora:1024:nockpt", "qwen2.5-1.5b:qlora:4096:ckpt", "qwen2.5-7b:lora:2048:ckpt",
    "qwen2.5-7b:lora:4096:ckpt", "qwen2.5-7b:qlora:2048:ckpt",
]


def ensure_model(shape: str, work: Path) -> Path:
    """A random-init model of ``shape`` with the demo tokenizer, written once per work directory."""
    from qwenloop.tiny import ensure_tiny_model

    tiny = Path(ensure_tiny_model(str(work / "tiny")))
    if shape == "tiny":
        return tiny
    out = work / f"model-{shape}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwenloop.plan.shapes import PRESETS

    s = PRESETS[shape]
    config = Qwen2Config(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                         num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads, vocab_size=s.vocab_size,
                         tie_word_embeddings=s.tie_word_embeddings, max_position_embeddings=32768, dtype=torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    for f in tiny.iterdir():  # the tokenizer (its ids are < every Qwen vocabulary)
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def write_data(path: Path, seq: int) -> None:
    """20 conversations longer than ``seq`` tokens (a short question, a long answer): every row is truncated
    to exactly ``seq`` tokens, most of them targets."""
    words = " ".join(f"w{i % 97}" for i in range(seq * 2))
    with path.open("w", encoding="utf-8") as f:
        for i in range(20):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                             {"role": "assistant", "content": words}]}) + "\n")


def run_case(case: str, work: Path, timeout: int) -> dict:
    shape, method, seq, ckpt = case.split(":")
    model = ensure_model(shape, work)
    run = work / "runs" / case.replace(":", "-")
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    write_data(run / "train.jsonl", int(seq))
    import yaml

    cfg = {"model": str(model), "train_file": str(run / "train.jsonl"), "output_dir": str(run / "out"),
           "max_seq_len": int(seq), "max_steps": 3, "micro_batch_size": 1, "gradient_checkpointing": ckpt == "ckpt",
           "quantization": {"bits": 4 if method == "qlora" else 0}, "warmup_steps": 1, "learning_rate": 1e-4}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    launch += ["--mixed_precision", "bf16"] if _has_gpu() else ["--cpu"]
    t0 = time.time()
    proc = subprocess.run([*launch, "-m", "qwenloop", "train", str(run / "config.yaml")], capture_output=True, text=True,
                          timeout=timeout)
    (run / "log.txt").write_text(proc.stdout + proc.stderr)
    row = {"case": case, "rc": proc.returncode, "seconds": round(time.time() - t0, 1)}
    if proc.returncode == 0:
        info = json.loads((run / "out" / "run.json").read_text())
        plan, peak = info.get("plan", {}), info["peak_memory_per_rank"][0]
        row.update(predicted_gib=plan.get("peak_allocated", 0) / 2**30 or None, measured_gib=peak.get("allocated_gib"),
                   reserved_gib=peak.get("reserved_gib"), terms={k: round(v / 2**30, 3) for k, v in plan.get("gpu_terms", {}).items()},
                   base_predicted=plan.get("base_param_bytes_per_rank"), base_measured=info["base_bytes_sharded_per_rank"][0])
    else:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return row


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def report(rows: list[dict]) -> str:
    lines = ["# qwenloop plan vs measured peak allocated GPU memory (bf16, micro-batch 1, LoRA r16 x 7)", "",
             "| case | predicted GiB | measured GiB | predicted / measured | reserved GiB | base bytes predicted = measured |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['case']} | failed rc={r['rc']}: {r.get('error', '')} | | | | |")
            continue
        p, m = r.get("predicted_gib"), r.get("measured_gib")
        ratio = f"{p / m:.3f}" if p and m else "n/a (no GPU)"
        lines.append(f"| {r['case']} | {p and round(p, 3)} | {m} | {ratio} | {r.get('reserved_gib')} | "
                     f"{r['base_predicted'] == r['base_measured']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/plan-vs-measured")
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    ap.add_argument("--out", help="write the Markdown table (and .json beside it) here")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per case")
    a = ap.parse_args()
    work = Path(a.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in a.cases:
        try:
            rows.append(run_case(case, work, a.timeout))
        except subprocess.TimeoutExpired:
            rows.append({"case": case, "rc": 124, "error": f"timeout after {a.timeout} s"})
        print(json.dumps(rows[-1]), flush=True)
        if a.out:  # rewritten after every case: a timeout keeps the rows done
            Path(a.out).write_text(report(rows) + "\n")
            Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(report(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
