"""``train(cfg)``: the whole training loop, top to bottom.

build (accelerator, data, model, optimizer, schedule) -> prepare -> loop over optimizer steps
(accumulate, autocast, backward, clip, step, log, eval) -> save the adapter -> end.

Backend differences live in ``distributed.py``; this file never asks which backend runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import data as data_lib
from . import distributed, model as model_lib
from .adapter import save_adapter
from .config import TrainConfig
from .errors import UserError

logger = logging.getLogger("qwenloop")

RUN_FILES = ("metrics.jsonl", "adapter")  # what marks a directory as holding a previous run


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str | None
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    backend: str = ""
    world_size: int = 1
    adapter_gather_bytes: int = 0
    base_bytes_per_rank: list = field(default_factory=list)  # frozen-base bytes held by each rank after loading
    model: object = field(default=None, repr=False)  # the trained PEFT model (unwrapped), for use in-process


def train(cfg: TrainConfig) -> TrainResult:
    # ---- where and how: accelerator first (ZeRO-3 must know its config before weights load) ----
    accelerator = distributed.create_accelerator(cfg)
    backend = distributed.backend_for(accelerator)
    backend.configure(cfg)
    _setup_logging(accelerator)
    _refuse_previous_run(cfg)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    logger.info(
        "backend %s, %d process(es), precision %s", backend.name, accelerator.num_processes, backend.mixed_precision
    )

    # ---- data (tokenized once on the main process, then read from the datasets cache) ----
    tokenizer = model_lib.load_tokenizer(cfg)
    with accelerator.main_process_first():
        train_data = data_lib.build_dataset(cfg.train_file, tokenizer, cfg)
        eval_data = data_lib.build_dataset(cfg.eval_file, tokenizer, cfg) if cfg.eval_file else None
    logger.info(
        "train: %d examples, %d target tokens; %d truncated and %d dropped at max_seq_len=%d",
        len(train_data.dataset), train_data.target_tokens, train_data.truncated, train_data.dropped, cfg.max_seq_len,
    )
    train_loader = data_lib.make_dataloader(
        train_data, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.seed, shuffle=True, num_workers=cfg.num_workers
    )
    eval_loader = (
        data_lib.make_dataloader(eval_data, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.seed, shuffle=False)
        if eval_data
        else None
    )

    # ---- model, optimizer (trainable parameters only), schedule ----
    model = model_lib.load_model(cfg, backend)
    # What each rank holds of the frozen base right after loading (ZeRO-3 loads partitioned).
    base_bytes_per_rank = accelerator.gather(
        torch.tensor([distributed.local_param_bytes(model, frozen_only=True)], device=accelerator.device)
    ).tolist()
    trainable = [p for p in model.parameters() if p.requires_grad]
    logger.info(
        "trainable parameters: %d (%.3f%% of %d)",
        sum(p.numel() for p in trainable),
        100 * sum(p.numel() for p in trainable) / max(1, _count_params(model)),
        _count_params(model),
    )
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.learning_rate,
        betas=tuple(cfg.adam_betas),
        weight_decay=cfg.weight_decay,
        fused=torch.cuda.is_available() or None,  # fused kernel on GPU, torch's default elsewhere
    )
    backend.before_prepare(model)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    gas = cfg.gradient_accumulation_steps
    steps_per_epoch = len(train_loader) // gas
    if steps_per_epoch == 0:
        raise UserError(
            f"train_file: {len(train_data.dataset)} examples make fewer micro-batches per process "
            f"({len(train_loader)}) than gradient_accumulation_steps ({gas}); lower it or add data"
        )
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    # Stepped by the loop after each real optimizer step (not handed to accelerate, whose wrapper
    # steps it once per process and would run the schedule num_processes times too fast).
    scheduler = _make_scheduler(cfg.lr_scheduler, optimizer, warmup, total_steps)
    logger.info(
        "%d optimizer steps (%d per epoch) of %d examples each (micro %d x accumulation %d x processes %d)",
        total_steps, steps_per_epoch, cfg.micro_batch_size * gas * accelerator.num_processes,
        cfg.micro_batch_size, gas, accelerator.num_processes,
    )
    _start_run_files(cfg, accelerator)
    if cfg.report_to:
        accelerator.init_trackers("qwenloop", config=_flat(cfg.to_dict()))

    # ---- the loop ----
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    progress = _progress_bar(accelerator, total_steps)
    losses: list[float] = []
    tokens_seen, started = 0, time.perf_counter()
    step, epoch = 0, 0
    model.train()
    while step < total_steps:
        train_loader.set_epoch(epoch)
        batches = iter(train_loader)
        for _ in range(steps_per_epoch):
            if step >= total_steps:
                break
            window = [next(batches) for _ in range(gas)]
            # Normalise by the target tokens of the whole optimizer step, over every micro-batch and
            # every rank: each target token weighs the same, however the batch was split.
            local_targets = sum(_count_targets(b) for b in window)
            step_targets = accelerator.reduce(torch.tensor(local_targets, device=accelerator.device), "sum").item()
            # accelerate divides each micro-batch loss by `gas` and DDP/ZeRO/FSDP average gradients
            # over ranks; multiplying by both leaves sum(token losses) / step_targets.
            loss_scale = gas * accelerator.num_processes / step_targets
            step_loss_sum, grad_norm = 0.0, None
            for batch in window:
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    token_loss_sum = _token_loss_sum(logits, batch["labels"])
                    accelerator.backward(token_loss_sum * loss_scale)
                    step_loss_sum += token_loss_sum.detach().float().item()
                    if accelerator.sync_gradients:
                        grad_norm = backend.clip_grad_norm(model, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            step += 1

            loss = accelerator.reduce(torch.tensor(step_loss_sum, device=accelerator.device), "sum").item() / step_targets
            tokens_seen += int(accelerator.reduce(torch.tensor(sum(int(b["attention_mask"].sum()) for b in window), device=accelerator.device), "sum").item())
            losses.append(loss)
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens_seen,
                "tokens_per_s": tokens_seen / (time.perf_counter() - started),
                "skipped": bool(accelerator.optimizer_step_was_skipped),
            }
            if cfg.eval_every_steps and eval_loader is not None and step % cfg.eval_every_steps == 0 and step < total_steps:
                record.update(evaluate(model, eval_loader, accelerator))
                model.train()
            if step % cfg.log_every_steps == 0 or step == total_steps or "eval_loss" in record:
                _log_metrics(accelerator, metrics_path, record)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            progress.update(1)
        epoch += 1
    progress.close()

    eval_metrics = {}
    if eval_loader is not None:
        eval_metrics = evaluate(model, eval_loader, accelerator)
        _log_metrics(accelerator, metrics_path, {"step": step, **eval_metrics})

    # ---- the adapter (gathered by every rank, written and verified by the main process) ----
    adapter_dir = save_adapter(accelerator, backend, model, tokenizer, os.path.join(cfg.output_dir, "adapter"))
    if adapter_dir:
        logger.info("adapter written to %s", adapter_dir)
    result = TrainResult(
        output_dir=cfg.output_dir,
        adapter_dir=adapter_dir,
        steps=step,
        losses=losses,
        eval_loss=eval_metrics.get("eval_loss"),
        backend=backend.name,
        world_size=accelerator.num_processes,
        adapter_gather_bytes=backend.last_gather_bytes,
        base_bytes_per_rank=base_bytes_per_rank,
        model=accelerator.unwrap_model(model),
    )
    if accelerator.is_main_process:
        summary = {k: v for k, v in result.__dict__.items() if k != "model"}
        summary["precision"] = backend.mixed_precision
        with open(os.path.join(cfg.output_dir, "run.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    accelerator.end_training()  # destroys the process group; without it ZeRO-3 on CPU aborts at exit
    return result


@torch.no_grad()
def evaluate(model, eval_loader, accelerator) -> dict[str, float]:
    """Token-weighted loss over the whole eval set, on all ranks, and its perplexity."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    targets = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for batch in eval_loader:
        with accelerator.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += _token_loss_sum(logits, batch["labels"]).double()
        targets += _count_targets(batch)
    # even_batches pads the last batches with repeated examples on some ranks; their few duplicated
    # tokens are a negligible bias for an eval loss.
    loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(targets, "sum").clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over target positions, computed in fp32."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=data_lib.IGNORE_INDEX,
        reduction="sum",
    )


def _count_targets(batch) -> int:
    return int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())


def _make_scheduler(kind: str, optimizer, warmup: int, total: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[kind]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _refuse_previous_run(cfg: TrainConfig) -> None:
    """Checked before anything is loaded, so a refused run costs nothing and touches nothing."""
    previous = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.output_dir, f))]
    if previous and not cfg.overwrite_output_dir:
        raise UserError(
            f"output_dir: {cfg.output_dir} already holds a previous run ({', '.join(previous)}); choose another "
            f"output_dir or set overwrite_output_dir: true"
        )


def _start_run_files(cfg: TrainConfig, accelerator) -> None:
    """Once everything loaded: a fresh metrics file and the config used, next to the adapter."""
    accelerator.wait_for_everyone()  # every rank has checked the directory before it changes
    if accelerator.is_main_process:
        import yaml

        os.makedirs(cfg.output_dir, exist_ok=True)
        open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w").close()
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    accelerator.wait_for_everyone()


def _log_metrics(accelerator, path: str, record: dict) -> None:
    if accelerator.is_main_process:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if accelerator.trackers:
        accelerator.log(numeric, step=record["step"])


def _progress_bar(accelerator, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", disable=not accelerator.is_local_main_process, dynamic_ncols=True)


def _setup_logging(accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logger.setLevel(level)


def _count_params(model) -> int:
    # ZeRO-3 partitioned parameters carry their full size in ds_numel.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
