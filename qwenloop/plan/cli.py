"""``qwenloop plan``: will this LoRA / QLoRA run fit on these GPUs, and how long will it take?

Two ways to ask:

* by hand: ``qwenloop plan --model qwen2.5-72b --gpu v100-32gb --gpus 8 --backend zero3 --method qlora
  --seq-len 2048`` (every ``PlanRequest`` field has a flag; defaults are the training config's);
* the exact run: ``qwenloop plan --config my.yaml --accelerate-config accelerate_configs/X.yaml --gpu
  v100-32gb`` reads everything from the files the run will be launched with (and counts the dataset's
  tokens with the model's tokenizer for the time per epoch).

Prints a table (per-GPU terms, host RAM per node, time, verdict, the changes that would make it fit,
``--search``: the largest micro-batch and sequence that fit), or ``--json``. Exit code 0 when it fits,
1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import CommandParser, UserError
from . import advice
from .buffers import GIB, ZeroSettings
from .estimate import METHODS, Plan, PlanRequest, estimate
from .gpus import GPU_PRESETS, custom_gpu, resolve_gpu
from .shapes import LINEAR_NAMES, PRESETS, resolve_model

BACKEND_CHOICES = {
    "single": {"backend": "single"},
    "ddp": {"backend": "ddp"},
    "zero3": {"backend": "zero3"},
    "zero3-offload-optimizer": {"backend": "zero3", "offload_optimizer": True},
    "zero3-offload": {"backend": "zero3", "offload_optimizer": True, "offload_param": True},
    "fsdp2": {"backend": "fsdp2"},
    "fsdp1": {"backend": "fsdp1"},
    "fsdp-offload": {"backend": "fsdp2", "offload_optimizer": True, "offload_param": True},
}



def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="qwenloop plan", description=__doc__.split("\n\n")[0])
    run = p.add_argument_group("the exact run (instead of the flags below)")
    run.add_argument("--config", help="training config YAML (model, LoRA, quantization, lengths, batch)")
    run.add_argument("--accelerate-config", help="accelerate config YAML (backend, processes, precision, DeepSpeed JSON)")
    m = p.add_argument_group("model and hardware")
    m.add_argument("--model", help=f"a preset ({', '.join(PRESETS)}) or a model directory / config.json")
    m.add_argument("--gpu", help=f"GPU preset: {', '.join(GPU_PRESETS)} (default: this machine's GPU)")
    m.add_argument("--gpu-memory-gib", type=float, help="a GPU that is not a preset: its memory")
    m.add_argument("--gpu-bf16", action=argparse.BooleanOptionalAction, default=True, help="... whether it has bf16")
    m.add_argument("--gpu-tflops", type=float, help="... its dense 16-bit peak TFLOPS")
    m.add_argument("--host-link-gbps", type=float, default=25.0, help="... its host link, GB/s")
    m.add_argument("--gpus", type=int, default=1, help="GPUs (processes) per node")
    m.add_argument("--nodes", type=int, default=1)
    m.add_argument("--host-ram-gib", type=float, help="host RAM per node, to check offload and loading against")
    r = p.add_argument_group("the run")
    r.add_argument("--method", choices=list(METHODS), default="lora", help="lora (16-bit base), qlora (4-bit), lora-8bit")
    r.add_argument("--backend", choices=list(BACKEND_CHOICES), help="default: single on 1 GPU, zero3 on several")
    r.add_argument("--precision", choices=["bf16", "fp16", "no"], help="default: bf16 where the GPU has it, else fp16")
    r.add_argument("--lora-rank", type=int, default=16)
    r.add_argument("--lora-targets", default=",".join(LINEAR_NAMES), help="comma-separated")
    r.add_argument("--seq-len", type=int, default=2048)
    r.add_argument("--micro-batch", type=int, default=1)
    r.add_argument("--grad-accum", type=int, default=1)
    r.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    r.add_argument("--full-logits", action="store_true", help="lm_head_targets_only off")
    r.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    r.add_argument("--packing", action="store_true")
    out = p.add_argument_group("time and output")
    out.add_argument("--dataset-tokens", type=int, help="tokens in one epoch (with --config and a local model directory: counted from train_file)")
    out.add_argument("--mfu", type=float, help="measured model-FLOPs utilization of this job (run.json's mfu)")
    out.add_argument("--search", action="store_true", help="also find the largest micro-batch and sequence that fit")
    out.add_argument("--json", action="store_true", help="print JSON for scripts")
    return p


def _gpu(args):
    if args.gpu:
        return resolve_gpu(args.gpu)
    if args.gpu_memory_gib:
        if not args.gpu_tflops:
            raise UserError("qwenloop plan: --gpu-memory-gib needs --gpu-tflops (the GPU's dense 16-bit peak)")
        return custom_gpu(args.gpu_memory_gib, args.gpu_bf16, args.gpu_tflops, args.host_link_gbps)
    try:
        import torch

        if torch.cuda.is_available():
            from .run import gpu_from_device

            return gpu_from_device()
    except ImportError:
        pass
    raise UserError(f"qwenloop plan: no GPU here; name one with --gpu ({', '.join(GPU_PRESETS)}) "
                    f"or describe it with --gpu-memory-gib and --gpu-tflops")


def request_from_args(args) -> PlanRequest:
    """The ``PlanRequest`` of the command line (``--config`` / ``--accelerate-config`` or the flags)."""
    gpu = _gpu(args)
    extra = {"host_ram_gib": args.host_ram_gib, "mfu": args.mfu}
    if args.config:
        return _request_from_files(args, gpu, extra)
    if not args.model:
        raise UserError("qwenloop plan: give --model (a preset or a model directory), or --config my.yaml")
    backend = BACKEND_CHOICES[args.backend or ("zero3" if args.gpus * args.nodes > 1 else "single")]
    precision = args.precision or ("bf16" if gpu.bf16 else "fp16")
    return PlanRequest(
        model=resolve_model(args.model), gpu=gpu, gpus_per_node=args.gpus, nodes=args.nodes, precision=precision,
        quant=METHODS[args.method], lora_rank=args.lora_rank,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        seq_len=args.seq_len, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
        checkpointing=not args.no_checkpointing, target_head=not args.full_logits, attn=args.attn,
        packing=args.packing, dataset_tokens=args.dataset_tokens, **backend, **extra,
    )


def _request_from_files(args, gpu, extra) -> PlanRequest:
    from ..config import TrainConfig
    from ..launch import read_launch_config
    from .run import request_for_run

    cfg = TrainConfig.from_yaml(args.config)
    if args.accelerate_config:
        launch = read_launch_config(args.accelerate_config)
    else:
        from ..launch import single_process_launch

        launch = single_process_launch()
    model = resolve_model(cfg.model)  # a bad model fails before the dataset is read
    tokens, fraction = (args.dataset_tokens, 1.0) if args.dataset_tokens else _count_dataset(cfg)
    return request_for_run(cfg, launch, gpu, model=model, dataset_tokens=tokens, target_fraction=fraction, **extra)


def _count_dataset(cfg) -> tuple[int | None, float]:
    """(tokens, target share) of ``cfg.train_file`` tokenized as training would; (None, 1.0) when it cannot be
    read here (no tokenizer in the model directory, a hub id): the plan then gives no time per epoch."""
    import os

    if not os.path.isdir(cfg.model):  # a hub id or a preset name: no tokenizer here, and no download
        print(f"note: dataset tokens not counted (model {cfg.model!r} is not a local directory with a tokenizer); "
              f"pass --dataset-tokens for the time per epoch", file=sys.stderr)
        return None, 1.0
    try:
        from .. import data as data_lib, model as model_lib

        tokenizer = model_lib.load_tokenizer(cfg)
        data = data_lib.build_dataset(cfg.train_file, tokenizer, cfg)
    except (UserError, OSError, ValueError) as e:
        print(f"note: dataset tokens not counted ({str(e).splitlines()[0]}); pass --dataset-tokens", file=sys.stderr)
        return None, 1.0
    tokens = int(sum(data.lengths))
    return tokens, max(1e-6, min(1.0, data.target_tokens / max(1, tokens)))


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def render(plan: Plan, fixes: list, search: dict | None = None) -> str:
    """The table for people."""
    r, t = plan.request, plan.time
    method = {"none": "LoRA", "nf4": "QLoRA (NF4)", "int8": "LoRA, 8-bit base"}[r.quant]
    offload = " + offload " + "/".join(n for n, on in (("param", r.offload_param), ("optimizer", r.offload_optimizer)) if on) \
        if r.offload_param or r.offload_optimizer else ""
    w = max(36, *(len(k) + 2 for k in (*plan.gpu_terms, *plan.host_terms, *plan.overhead)))
    lines = [
        f"{r.model.name} ({r.model.num_params / 1e9:.1f}B) · {method} r={r.lora_rank} on {len(r.lora_targets)} targets "
        f"· {r.backend}{offload} on {r.gpus_per_node}x {r.gpu.name} x {r.nodes} node(s) · {r.precision}",
        f"seq {r.seq_len} x micro-batch {r.micro_batch} x accumulation {r.grad_accum} · checkpointing "
        f"{'on' if r.checkpointing else 'off'} · chunked loss {'on' if r.target_head else 'off'} · attention {r.attn}",
        "",
        f"{'per GPU, at the peak (' + plan.peak_moment + ')':<{w + 2}}     GiB",
    ]
    lines += [f"  {k:<{w}}{_gib(v)}" for k, v in plan.gpu_terms.items()]
    lines.append(f"  {'= peak allocated':<{w}}{_gib(plan.peak_allocated)}   (torch.cuda.max_memory_allocated)")
    lines += [f"  {'+ ' + k.replace('_', ' '):<{w}}{_gib(v)}" for k, v in plan.overhead.items()]
    lines.append(f"  {'= required':<{w}}{_gib(plan.required)}   of {r.gpu.memory_gib:g} GiB")
    lines += ["", f"{'host RAM per node':<{w + 2}}     GiB"]
    lines += [f"  {k:<{w}}{_gib(v)}" for k, v in plan.host_terms.items()]
    if r.host_ram_gib:
        lines.append(f"  {'available':<{w}}{r.host_ram_gib:8.2f}")
    epoch = f" · {t.epoch_hours:.2f} h per epoch of {r.dataset_tokens:,} tokens" if t.epoch_hours is not None else ""
    lines += ["", f"time: {t.step_s:.3g} s per step (compute {t.compute_s:.3g}, all-gather {t.allgather_s:.3g} overlapped, "
                  f"host {t.host_transfer_s:.3g}) · {t.tokens_per_s:,.0f} tokens/s · MFU {t.mfu:.0%}{epoch}",
              "", f"verdict: {plan.verdict}"]
    if fixes:
        lines.append("changes that would make it fit, cheapest first:")
        lines += [f"  {i}. {s.line()}" for i, s in enumerate(fixes, 1)]
    elif not plan.fits:
        lines.append("no change considered here makes it fit: more GPUs, or a smaller model")
    if search:
        lines.append(f"largest micro-batch that fits at seq {r.seq_len}: {search['micro_batch'] or 'none'}; "
                     f"largest seq at micro-batch {r.micro_batch}: {search['seq_len'] or 'none'}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    request = request_from_args(args)
    plan = estimate(request)
    fixes = advice.suggestions(plan)
    search = None
    if args.search:
        search = {f: advice.largest_fitting(request, f) for f in ("micro_batch", "seq_len")}
    if args.json:
        out = plan.to_dict()
        out["suggestions"] = [{"change": s.what, "set": {k: (v.__dict__ if isinstance(v, ZeroSettings) else v)
                                                        for k, v in s.changes.items()},
                               "required": s.plan.required, "slowdown": s.slowdown, "changes_the_job": s.changes_the_job}
                              for s in fixes]
        if search is not None:
            out["search"] = search
        print(json.dumps(out, indent=1))
    else:
        print(render(plan, fixes, search))
    return 0 if plan.fits else 1


__all__ = ["main", "render", "request_from_args", "BACKEND_CHOICES"]
