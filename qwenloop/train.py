"""``train(cfg)``: the whole training loop, top to bottom.

build (accelerator, data, model, optimizer, schedule) -> prepare -> resume -> loop over optimizer steps
(accumulate, autocast, backward, clip, NaN sentinel, step, log, eval, checkpoint, preemption) -> save the
adapter -> end.

Backend differences live in ``distributed.py``; this file never asks which backend runs.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from . import agreement, checkpoint, faults, runfiles
from . import batching as batching_lib
from . import data as data_lib
from . import distributed, model as model_lib, report
from .adapter import save_adapter
from .checks import check_run
from .config import TrainConfig, flatten_config
from .errors import RunStopped, UserError
from .launch import launch_from_accelerator
from .plan import run as plan_run
from .loss import batch_loss_sum, find_target_loss_head
from .metrics import COUNTED, StepMeter, peak_memory
from .sentinel import NonFiniteSentinel
from .signals import StopSignals

logger = logging.getLogger("qwenloop")


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
    base_bytes_sharded_per_rank: list = field(default_factory=list)  # ... and once the backend has sharded it
    local_rank_per_rank: list = field(default_factory=list)  # each rank's index on its machine
    resumed_from: str | None = None  # the checkpoint this run continued from
    last_checkpoint: str | None = None
    bad_steps: int = 0  # non-finite steps skipped by the sentinel
    model: object = field(default=None, repr=False)  # the trained PEFT model (unwrapped), for use in-process


def train(cfg: TrainConfig) -> TrainResult:
    started = time.time()
    # ---- where and how: accelerator first (ZeRO-3 must know its config before weights load) ----
    accelerator = distributed.create_accelerator(cfg)
    backend = distributed.backend_for(accelerator)
    check_run(cfg, accelerator, logger)  # every check `qwenloop doctor` runs; errors stop here, before anything loads
    backend.configure(cfg)
    _setup_logging(accelerator)
    # A bad resume_from, or a damaged checkpoint, fails here, before anything loads (every rank decides the same).
    resume_dir = checkpoint.resolve_resume(cfg, announce=accelerator.is_main_process)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    logger.info(
        "backend %s, %d process(es), precision %s", backend.name, accelerator.num_processes, backend.mixed_precision
    )

    # ---- data (tokenized once on the main process, then read from the datasets cache; a bad file ends
    # every process with the same data report line, not only the main one) ----
    tokenizer = model_lib.load_tokenizer(cfg)
    train_data, eval_data = agreement.main_process_first(accelerator, lambda: (
        data_lib.build_dataset(cfg.train_file, tokenizer, cfg),
        data_lib.build_dataset(cfg.eval_file, tokenizer, cfg) if cfg.eval_file else None,
    ))
    logger.info(
        "train: %d examples, %d target tokens; %d truncated and %d dropped at max_seq_len=%d; %d bad records skipped",
        len(train_data.dataset), train_data.target_tokens, train_data.truncated, train_data.dropped, cfg.max_seq_len,
        train_data.bad_records,
    )
    # Padded micro-batches of `micro_batch_size` examples (similar lengths together with group_by_length),
    # or with packing `micro_batch_size` rows of several examples each.
    batching = dict(packing=cfg.packing, group_by_length=cfg.group_by_length, max_seq_len=cfg.max_seq_len)
    train_loader = batching_lib.make_dataloader(
        train_data, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.seed, shuffle=True, num_workers=cfg.num_workers, **batching
    )
    eval_loader = (
        batching_lib.make_dataloader(eval_data, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.seed, shuffle=False, **batching)
        if eval_data
        else None
    )
    if cfg.packing:
        logger.info("packing: %d examples in %d rows of up to %d tokens", len(train_data.dataset), len(train_loader.dataset), cfg.max_seq_len)

    # ---- model, optimizer (trainable parameters only), schedule ----
    model = model_lib.load_model(cfg, backend)
    if cfg.packing:
        try:
            batching_lib.check_packing_support(model.config, cfg.micro_batch_size)
        except ValueError as e:
            raise UserError(f"packing: {e}")
    # What each rank holds of the frozen base right after loading (ZeRO-3 loads partitioned), and
    # where each rank runs (its index on its machine: [0, 1] is one machine, [0, 0] two).
    base_bytes_per_rank, local_rank_per_rank = accelerator.gather(torch.tensor(
        [[distributed.local_param_bytes(model, frozen_only=True), accelerator.local_process_index]], device=accelerator.device
    )).T.tolist()
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
    # The planner's prediction for this run (on a GPU: the whole plan, logged), written to run.json next
    # to what the run really holds and peaks at: every run is a calibration point of `qwenloop plan`.
    plan = plan_run.training_record(cfg, launch_from_accelerator(accelerator), model.config,
                                    accelerator.num_processes, model.get_input_embeddings().weight.element_size(),
                                    on_gpu=torch.cuda.is_available())
    if "verdict" in plan:
        logger.info("plan: %s; predicted peak allocated %.2f GiB per GPU", plan["verdict"], plan["peak_allocated"] / 2**30)
    backend.before_prepare(model)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # What each rank holds of the base once the backend has sharded it (FSDP shards at prepare).
    base_bytes_sharded_per_rank = accelerator.gather(torch.tensor(
        [distributed.local_param_bytes(model, frozen_only=True)], device=accelerator.device)).tolist()
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
        "%d optimizer steps (%d per epoch) of %d %s each (micro %d x accumulation %d x processes %d)",
        total_steps, steps_per_epoch, cfg.micro_batch_size * gas * accelerator.num_processes, "packed rows" if cfg.packing else "examples",
        cfg.micro_batch_size, gas, accelerator.num_processes,
    )

    # ---- resume: adapter, optimizer, scheduler, GradScaler, RNG, data position ----
    checkpoints = checkpoint.Checkpointer(cfg, accelerator, backend, model, optimizer, scheduler)
    state = checkpoint.TrainerState(sampler_seed=cfg.seed, identity=checkpoint.run_identity(cfg, accelerator.num_processes, train_data))
    if resume_dir:
        state = checkpoints.resume(resume_dir, state.identity, steps_per_epoch * gas)
    sentinel = NonFiniteSentinel(accelerator, backend, cfg.max_bad_steps, state.sentinel)
    runfiles.start_run_files(cfg, accelerator, state, resumed_from=resume_dir)
    if cfg.report_to:  # trackers take a flat table of scalar hyperparameters
        flat = flatten_config(cfg.to_dict())
        accelerator.init_trackers("qwenloop", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()})

    # ---- the loop ----
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    progress = _progress_bar(accelerator, total_steps, initial=state.step)
    head = find_target_loss_head(model)  # None: the loss is computed from the full logits
    meter = StepMeter(accelerator, accelerator.unwrap_model(model), cfg, backend.mixed_precision, state)
    losses: list[float] = []
    model.train()
    with StopSignals() as signals, progress:  # the bar is closed however the loop ends
        try:
            while state.step < total_steps:
                # Mid-epoch after a resume: the micro-batches already consumed are skipped, not loaded.
                batches = checkpoint.epoch_batches(accelerator, train_loader, state.epoch, state.batches_in_epoch)
                for _ in range(state.batches_in_epoch // gas, steps_per_epoch):
                    if state.step >= total_steps:
                        break
                    meter.start_step()
                    window = [next(batches) for _ in range(gas)]
                    meter.data_done()
                    step_out = _optimizer_step(model, window, optimizer, accelerator, backend, sentinel, head, cfg, state.step + 1, meter)
                    skipped = not step_out.finite or accelerator.optimizer_step_was_skipped
                    lr = scheduler.get_last_lr()[0]  # the rate this step used
                    if not skipped:
                        scheduler.step()
                    epoch = state.epoch
                    state.advance(gas, steps_per_epoch * gas)  # step + 1, and the data position
                    sentinel.record(state.step, not skipped, backend.loss_scale(model))

                    step = state.step
                    losses.append(step_out.loss)
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "loss": step_out.loss,
                        "lr": lr,
                        "grad_norm": step_out.grad_norm,
                        **meter.end_step(step_out.counts),  # tokens, throughput, padding, time split, memory, MFU
                        "skipped": bool(skipped),
                        "bad_steps": sentinel.total,
                    }
                    loss_scale = backend.loss_scale(model)
                    if loss_scale is not None:  # fp16: the scale, next to `skipped` and `bad_steps`
                        record["loss_scale"] = loss_scale
                    if cfg.eval_every_steps and eval_loader is not None and step % cfg.eval_every_steps == 0 and step < total_steps:
                        record.update(evaluate(model, eval_loader, accelerator, head))
                        model.train()
                    if step % cfg.log_every_steps == 0 or step == total_steps or "eval_loss" in record or skipped:
                        runfiles.log_metrics(accelerator, metrics_path, record)
                    progress.set_postfix(
                        loss=f"{step_out.loss:.4f}", lr=f"{lr:.2e}", tgt_tok_s=f"{record['target_tokens_per_s']:.0f}",
                        **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
                    )
                    progress.update(1)

                    # ---- failures, checkpoints, preemption (every rank decides the same) ----
                    if sentinel.exhausted:
                        raise sentinel.stop(cfg.output_dir, checkpoints.last)
                    state.sentinel = sentinel.state()
                    if checkpoints.due(step) and sentinel.consecutive == 0:  # never right after a non-finite step
                        checkpoints.save(state)
                    signum = signals.agreed(accelerator, step)  # did any rank get SIGTERM/SIGINT?
                    if signum:
                        raise checkpoints.preempted(state, signum)
        except RunStopped:
            _end(accelerator)
            raise

    eval_metrics = {}
    if eval_loader is not None:
        eval_metrics = evaluate(model, eval_loader, accelerator, head)
        runfiles.log_metrics(accelerator, metrics_path, {"step": state.step, **eval_metrics})

    # ---- the adapter (gathered by every rank, written and verified by the main process) ----
    adapter_dir = save_adapter(accelerator, backend, model, tokenizer, os.path.join(cfg.output_dir, "adapter"))
    if adapter_dir:
        logger.info("adapter written to %s", adapter_dir)
    result = TrainResult(
        output_dir=cfg.output_dir,
        adapter_dir=adapter_dir,
        steps=state.step,
        losses=losses,
        eval_loss=eval_metrics.get("eval_loss"),
        backend=backend.name,
        world_size=accelerator.num_processes,
        adapter_gather_bytes=backend.last_gather_bytes,
        base_bytes_per_rank=base_bytes_per_rank,
        base_bytes_sharded_per_rank=base_bytes_sharded_per_rank,
        local_rank_per_rank=local_rank_per_rank,
        resumed_from=resume_dir,
        last_checkpoint=checkpoints.last,
        bad_steps=sentinel.total,
        model=accelerator.unwrap_model(model),
    )
    memory = peak_memory(accelerator)  # collective: every rank's peak
    if accelerator.is_main_process:
        summary = {k: v for k, v in result.__dict__.items() if k != "model"}
        summary["precision"] = backend.mixed_precision
        summary.update(meter.summary())  # train seconds, tokens and target tokens seen, throughput, padding, MFU
        summary["peak_memory_per_rank"] = memory
        summary["plan"] = plan
        summary["bad_records_skipped"] = train_data.bad_records + (eval_data.bad_records if eval_data else 0)
        summary["wall_seconds"] = round(time.time() - started, 3)  # loading, tokenizing and saving included
        summary["command"] = report.command_line()  # what reproduces this run (report.md shows it)
    runfiles.write_run_summary(accelerator, os.path.join(cfg.output_dir, "run.json"), summary if accelerator.is_main_process else None)
    if accelerator.is_main_process:
        report.finish_run(cfg.output_dir)  # report.md, and curves.png when matplotlib is installed; never fails the run
    _end(accelerator)
    return result


@dataclass
class StepOutcome:
    loss: float  # summed token losses / target tokens, over every micro-batch and rank of the step
    grad_norm: float | None
    finite: bool  # the same on every rank
    counts: list[float]  # COUNTED over every rank: target tokens, tokens, positions, attention pairs


def _optimizer_step(model, window, optimizer, accelerator, backend, sentinel, head, cfg, step: int, meter) -> StepOutcome:
    """Forward/backward over the ``gas`` micro-batches of one window, clip, and step unless the
    sentinel found the step non-finite on any rank.

    Nothing here reads a device value back per micro-batch (a GPU would idle while the host waits):
    the counts come from the collator as ints, the loss is summed on the device, and the host
    learns the step's numbers once, at its end."""
    # Normalise by the target tokens of the whole optimizer step, over every micro-batch and every
    # rank: each target token weighs the same, however the batch was split.
    local_counts = [float(sum(b[k] for b in window)) for k in COUNTED]
    counts = accelerator.reduce(torch.tensor(local_counts, dtype=torch.float64, device=accelerator.device), "sum")
    # accelerate divides each micro-batch loss by `gas` and DDP/ZeRO/FSDP average gradients over
    # ranks; multiplying by both leaves sum(token losses) / step_targets.
    loss_scale = (len(window) * accelerator.num_processes / counts[0].clamp(min=1)).float()
    step_loss_sum = torch.zeros((), dtype=torch.float32, device=accelerator.device)
    grad_norm, finite = None, True
    for batch in window:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss_sum = batch_loss_sum(model, batch, head)
            loss_sum = faults.poison_loss(loss_sum, accelerator.process_index, step)  # test-only hook
            accelerator.backward(loss_sum * loss_scale)
            step_loss_sum += loss_sum.detach().float()
            if accelerator.sync_gradients:
                meter.forward_backward_done()
                grad_norm = backend.clip_grad_norm(model, cfg.max_grad_norm)
                finite = sentinel.agree(step, step_loss_sum, grad_norm, model)  # the same answer on every rank
                backend.optimizer_step(model, optimizer, finite)
            optimizer.zero_grad(set_to_none=True)
    step_loss = accelerator.reduce(step_loss_sum.double(), "sum").reshape(1)
    numbers = torch.cat([step_loss, counts, _as_tensor(grad_norm, step_loss)]).tolist()  # the step's one read-back
    meter.optimizer_done()
    return StepOutcome(
        loss=numbers[0] / max(numbers[1], 1.0),
        grad_norm=numbers[5] if grad_norm is not None else None,
        finite=finite,
        counts=numbers[1:5],
    )


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    if value is None:
        return like.new_zeros(1)
    return torch.as_tensor(value, dtype=like.dtype).to(like.device).reshape(1)


@torch.no_grad()
def evaluate(model, eval_loader, accelerator, head=None) -> dict[str, float]:
    """Token-weighted loss over the whole eval set, on all ranks, and its perplexity."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    targets = 0
    for batch in eval_loader:
        with accelerator.autocast():
            loss_sum += batch_loss_sum(model, batch, head).double()
        targets += batch["num_targets"]
    # even_batches pads the last batches with repeated examples on some ranks; their few duplicated
    # tokens are a negligible bias for an eval loss.
    totals = accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(targets), dtype=torch.float64, device=loss_sum.device)]), "sum")
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _make_scheduler(kind: str, optimizer, warmup: int, total: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[kind]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _end(accelerator) -> None:
    """All ranks leave together, then the process group is destroyed (trackers closed). A CPU run's
    gloo threads can still abort the interpreter's exit after this: ``cli.exit_process`` is the cure."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _progress_bar(accelerator, total: int, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", disable=not accelerator.is_local_main_process, dynamic_ncols=True)


def _setup_logging(accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logger.setLevel(level)


def _count_params(model) -> int:
    # ZeRO-3 partitioned parameters carry their full size in ds_numel.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
