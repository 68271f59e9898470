"""The README's answer to the seed's question, printed by the planner itself: can Qwen2.5-72B be LoRA / QLoRA
tuned on 8x V100 32GB, with which backend, at which sequence length, and how long does 10M tokens take?

    python bench/plan_table.py            # the Markdown table the README quotes (tests/test_plan_estimate.py
                                          # checks the README holds exactly this output)
"""

from __future__ import annotations

from qwenloop.plan.estimate import PlanRequest, estimate
from qwenloop.plan.gpus import resolve_gpu
from qwenloop.plan.shapes import resolve_model

BACKENDS = {
    "ZeRO-3": dict(backend="zero3"),
    "ZeRO-3 + offload (param, optimizer)": dict(backend="zero3", offload_param=True, offload_optimizer=True),
    "FSDP2": dict(backend="fsdp2"),
}
METHODS = {"LoRA": "none", "QLoRA": "nf4"}
HOST_RAM_GIB = 512
TOKENS = 10_000_000


def rows():
    for method, quant in METHODS.items():
        for name, backend in BACKENDS.items():
            for seq in (1024, 2048, 4096):
                request = PlanRequest(model=resolve_model("qwen2.5-72b"), gpu=resolve_gpu("v100-32gb"), gpus_per_node=8,
                                      precision="fp16", quant=quant, seq_len=seq, host_ram_gib=HOST_RAM_GIB,
                                      dataset_tokens=TOKENS, **backend)
                yield method, name, seq, estimate(request)


def table() -> str:
    lines = ["| method | backend | seq | fits | per GPU (GiB, of 31.7) | host RAM per node (GiB) | hours / 10M tokens |",
             "|---|---|---|---|---|---|---|"]
    for method, name, seq, plan in rows():
        fits = "yes" if plan.fits else f"**no** (+{-plan.spare / 2**30:.1f})"
        lines.append(f"| {method} | {name} | {seq} | {fits} | {plan.required / 2**30:.1f} | "
                     f"{plan.host_required / 2**30:.0f} | {plan.time.epoch_hours:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
