"""What to change when a plan does not fit, and how far a plan that fits can go.

``suggestions(plan)``: every single change that makes the plan fit, ranked by what it costs in step time
(``timing``), each with its plan. Changes that keep the job the same (the same tokens, the same
trained adapter up to numerics) come first; changes to the job itself (a shorter ``max_seq_len``, a 4-bit
base: different numerics) are marked as such. When no single change is enough, the cheapest
combination found greedily (largest memory saving per second of step time first) is offered.

``largest_fitting(request, field)``: the largest micro-batch, or sequence length (a multiple of 256), that
fits with everything else unchanged (search mode).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .estimate import Plan, PlanRequest, estimate, with_changes

GIB = 2**30


@dataclass
class Suggestion:
    """One change (``changes``: ``PlanRequest`` fields) and its plan."""

    what: str
    """In words, with the config key to set."""
    changes: dict
    plan: Plan
    slowdown: float
    """Step time with the change / step time without (< 1: faster)."""
    changes_the_job: bool = False
    """True when the run would train on something else or with other numerics."""

    def line(self) -> str:
        cost = f"{self.slowdown:.2f}x step time"
        job = "; changes the job" if self.changes_the_job else ""
        return f"{self.what}: {self.plan.required / GIB:.1f} GiB per GPU, {cost}{job}"


def _candidates(r: PlanRequest) -> list[tuple[str, dict, bool]]:
    """(description, changes, changes_the_job) for every change that applies to ``r``."""
    out: list[tuple[str, dict, bool]] = []
    if not r.target_head:
        out.append(("lm_head_targets_only: true (chunked head and loss on target positions)", {"target_head": True}, False))
    if r.attn == "eager":
        out.append(("attn_implementation: sdpa", {"attn": "sdpa"}, False))
    if not r.checkpointing:
        out.append(("gradient_checkpointing: true", {"checkpointing": True}, False))
    if r.micro_batch > 1:
        out.append((f"micro_batch_size: 1, gradient_accumulation_steps: {r.micro_batch * r.grad_accum} (same global batch)",
                    {"micro_batch": 1, "grad_accum": r.micro_batch * r.grad_accum}, False))
    if r.world_size > 1 and r.backend in ("ddp", "single"):
        out.append(("accelerate config: deepspeed_zero3.yaml (shard the base over the GPUs)", {"backend": "zero3"}, False))
        out.append(("accelerate config: fsdp.yaml (FSDP2, shard the base over the GPUs)", {"backend": "fsdp2"}, False))
    if r.fsdp and r.world_size > 1:
        out.append(("accelerate config: deepspeed_zero3.yaml (ZeRO-3 gathers one module at a time, FSDP whole layers and "
                    "keeps the embedding and head gathered)", {"backend": "zero3"}, False))
    lean_live = 10**8
    if r.backend == "zero3" and (r.zero.max_live_parameters > lean_live or r.zero.max_reuse_distance > lean_live):
        # The prefetcher keeps gathering until max_live_parameters (buffers.py): a lower cap gathers less ahead.
        lean = replace(r.zero, max_live_parameters=min(lean_live, r.zero.max_live_parameters),
                       max_reuse_distance=min(lean_live, r.zero.max_reuse_distance))
        out.append(("DeepSpeed JSON: stage3_max_live_parameters and stage3_max_reuse_distance 1e8 (less gathered ahead; "
                    "all-gathers overlap compute a little less)", {"zero": lean}, False))
    if r.fsdp and not r.reshard_after_forward:
        out.append(("fsdp_reshard_after_forward: true", {"reshard_after_forward": True}, False))
    if r.backend == "zero3" and not r.offload_optimizer:
        out.append(("DeepSpeed JSON: offload_optimizer to cpu (deepspeed_zero3_offload.json)", {"offload_optimizer": True}, False))
    if r.backend == "zero3" and not r.offload_param:
        out.append(("DeepSpeed JSON: offload_param and offload_optimizer to cpu (deepspeed_zero3_offload.json)",
                    {"offload_param": True, "offload_optimizer": True}, False))
    if r.fsdp and not r.offload_param:
        out.append(("accelerate config: fsdp_offload_params: true (fsdp_offload.yaml)",
                    {"offload_param": True, "offload_optimizer": True}, False))
    if r.quant == "none":
        out.append(("quantization.bits: 4 (QLoRA)", {"quant": "nf4"}, True))
    if r.seq_len > 256:
        shorter = max(256, (r.seq_len // 2) // 256 * 256)
        out.append((f"max_seq_len: {shorter}", {"seq_len": shorter}, True))
    return out


def _try(r: PlanRequest, changes: dict) -> Plan | None:
    try:
        return estimate(with_changes(r, **changes))
    except Exception:  # a combination the request refuses (e.g. offload on a backend without it)
        return None


def suggestions(plan: Plan, limit: int = 6) -> list[Suggestion]:
    """Changes that make ``plan`` fit, cheapest first (jobs kept before jobs changed); [] when it fits."""
    if plan.fits:
        return []
    r, base_s = plan.request, plan.time.step_s
    tried = []
    for what, changes, job in _candidates(r):
        p = _try(r, changes)
        if p is not None:
            tried.append(Suggestion(what, changes, p, p.time.step_s / base_s, job))
    fitting = sorted((s for s in tried if s.plan.fits), key=lambda s: (s.changes_the_job, s.slowdown))
    if fitting:
        return fitting[:limit]
    combined = _greedy(plan)
    return [combined] if combined else []


def _greedy(plan: Plan, rounds: int = 6) -> Suggestion | None:
    """Apply one change at a time, each round the one that saves the most GiB per second of step time it
    costs (changes that keep the job first), re-planning after each, until the plan fits."""
    current, changes, words, job = plan, {}, [], False
    for _ in range(rounds):
        options = []
        for what, change, changes_job in _candidates(current.request):
            p = _try(current.request, change)
            if p is not None and p.required < current.required:
                extra = max(p.time.step_s - current.time.step_s, 1e-3)
                options.append(((changes_job, -(current.required - p.required) / extra), what, change, changes_job, p))
        if not options:
            return None
        _, what, change, changes_job, current = min(options, key=lambda o: o[0])
        changes.update(change)
        words.append(what)
        job |= changes_job
        if current.fits:
            return Suggestion(" + ".join(words), changes, current, current.time.step_s / plan.time.step_s, job)
    return None


def largest_fitting(request: PlanRequest, field: str, limit: int | None = None) -> int | None:
    """The largest ``micro_batch`` or ``seq_len`` (a multiple of 256) that fits, others unchanged; None if none."""
    if field not in ("micro_batch", "seq_len"):
        raise ValueError(field)
    step = 256 if field == "seq_len" else 1
    if limit is None:
        limit = (request.model.max_position_embeddings or 131072) if field == "seq_len" else 4096

    def fits(n: int) -> bool:
        p = _try(request, {field: n})
        return p is not None and p.fits

    if not fits(step):
        return None
    lo, hi = step, step
    while hi < limit and fits(min(hi * 2, limit)):
        lo = hi = min(hi * 2, limit)
    if hi >= limit:
        return lo
    hi = min(hi * 2, limit)  # lo fits, hi does not
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


__all__ = ["Suggestion", "suggestions", "largest_fitting"]
