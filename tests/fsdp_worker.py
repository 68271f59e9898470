"""One rank of a 2-rank FSDP training on CPU/gloo (run by torchrun from test_fsdp.py).

accelerate refuses FSDP on CPU (its state enables FSDP only for GPU-like devices), so this worker does
what ``accelerator.prepare`` does for FSDP, with accelerate's own pieces wherever they run on a CPU:

- the FSDP plugin is accelerate's ``FullyShardedDataParallelPlugin``, built from the ``FSDP_*``
  environment that ``accelerate launch`` derives from one of the repo's ``accelerate_configs/*.yaml``
  (test_fsdp.py computes it with accelerate's launcher code);
- FSDP2: accelerate's ``fsdp2_prepare_model`` (units from the model's ``_no_split_modules``, the
  cpu-ram-efficient broadcast of rank 0's weights to the ranks that loaded on meta);
- FSDP1: ``FullyShardedDataParallel`` with the keyword arguments accelerate builds from that plugin
  (without cpu-ram-efficient loading, which needs a GPU under FSDP1: see fsdp_plugin_from_launcher_env).

and qwenloop's own code for the rest: ``load_model`` (ranks > 0 on meta), ``FSDPBackend`` (FSDP1 wrap
policy, adapter gather, checkpoint optimizer state, adapter load for resume), ``Checkpointer``, the loss.
The data is split across ranks exactly as accelerate's dataloader shard does.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py CONFIG.yaml OUT_DIR [--stop-after N] [--resume CKPT]

Writes, on rank 0: metrics.jsonl (the steps this process ran), run.json, and adapter/ (not with
--stop-after, which ends with a checkpoint of step N, as a preempted run does).
"""

import argparse
import json
import logging
import os
import types

import torch
import torch.distributed as dist

from qwenloop import TrainConfig
from qwenloop.adapter import save_adapter
from qwenloop.checks import check_run
from qwenloop.checkpoint import Checkpointer, TrainerState, run_identity
from qwenloop.cli import exit_process
from qwenloop.batching import make_dataloader
from qwenloop.data import build_dataset
from qwenloop.distributed import FSDPBackend, local_param_bytes
from qwenloop.loss import batch_loss_sum, find_target_loss_head
from qwenloop.model import load_model, load_tokenizer
from qwenloop.train import _make_scheduler


class StandInAccelerator:
    """What qwenloop's FSDPBackend / Checkpointer and accelerate's fsdp2_prepare_model read of an
    Accelerator, answered with torch.distributed on gloo."""

    mixed_precision = "no"
    scaler = None
    device = torch.device("cpu")

    def __init__(self, plugin):
        self.state = types.SimpleNamespace(fsdp_plugin=plugin)
        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()
        self.is_main_process = self.is_local_main_process = self.process_index == 0
        self.step = 0

    def unwrap_model(self, model):
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(model)

    def wait_for_everyone(self):
        dist.barrier()

    def reduce(self, tensor, reduction="sum"):
        out = tensor.clone()
        dist.all_reduce(out, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[reduction])
        return out


def prepare_fsdp1(accelerator, model):
    """accelerate's FSDP1 branch of ``prepare_model``: FullyShardedDataParallel with the plugin's settings."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin = accelerator.state.fsdp_plugin
    plugin.set_auto_wrap_policy(model)
    return FSDP(model, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                sync_module_states=plugin.sync_module_states, backward_prefetch=plugin.backward_prefetch,
                forward_prefetch=plugin.forward_prefetch, use_orig_params=plugin.use_orig_params,
                limit_all_gathers=plugin.limit_all_gathers, device_id=accelerator.device)


def fsdp_plugin_from_launcher_env():
    """accelerate's plugin, configured by the FSDP_* variables as under ``accelerate launch``.

    On a CPU the plugin refuses ``sync_module_states`` (it looks for a GPU to build its default
    ``param_init_fn``), so it is built without. FSDP2 gets ``cpu_ram_efficient_loading`` back (its
    broadcast is accelerate's ``fsdp2_load_full_state_dict``, which runs on gloo). FSDP1 runs without
    it: its ``sync_module_states`` broadcast requires GPU tensors (torch refuses CPU ones), so FSDP1's
    cpu-ram-efficient loading is a GPU check (bench/gpu_check.sh).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    ram_efficient = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true"
    os.environ["FSDP_SYNC_MODULE_STATES"] = os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    plugin = FullyShardedDataParallelPlugin()
    plugin.cpu_ram_efficient_loading = ram_efficient and plugin.fsdp_version == 2
    return plugin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out_dir")
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig.from_yaml(args.config)
    cfg.resume_from = args.resume  # what `--resume_from PATH` does for `qwenloop train` (the checks read it)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    accelerator = StandInAccelerator(fsdp_plugin_from_launcher_env())
    backend = FSDPBackend(accelerator)
    check_run(cfg, accelerator, logging.getLogger("qwenloop"))  # as train() does: the repo's yamls must pass its checks
    backend.configure(cfg)
    version = backend.fsdp_version
    tokenizer = load_tokenizer(cfg)
    data = build_dataset(cfg.train_file, tokenizer, cfg)
    model = load_model(cfg, backend)
    base_bytes_after_load = local_param_bytes(model, frozen_only=True)

    backend.before_prepare(model)
    if version == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        wrapped = fsdp2_prepare_model(accelerator, model)
    else:
        wrapped = prepare_fsdp1(accelerator, model)
    # After prepare: every rank holds its shard (rank > 0 got its values from rank 0's broadcast).
    base_bytes_after_prepare = local_param_bytes(wrapped, frozen_only=True)

    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    scheduler = _make_scheduler(cfg.lr_scheduler, optimizer, cfg.warmup_steps, cfg.max_steps)
    loader = make_dataloader(data, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.seed, shuffle=True,
                             packing=cfg.packing, group_by_length=cfg.group_by_length, max_seq_len=cfg.max_seq_len)
    loader.sampler.set_epoch(0)
    mine = [b for i, b in enumerate(loader) if i % world == rank]  # accelerate's BatchSamplerShard order
    gas = cfg.gradient_accumulation_steps

    checkpoints = Checkpointer(cfg, accelerator, backend, wrapped, optimizer, scheduler)
    state = TrainerState(sampler_seed=cfg.seed, identity=run_identity(cfg, world, data))
    if args.resume:
        state = checkpoints.resume(args.resume, state.identity, len(mine))

    head = find_target_loss_head(wrapped)
    losses = {}
    wrapped.train()
    while state.step < cfg.max_steps:
        window = mine[state.step * gas:(state.step + 1) * gas]
        targets = torch.tensor(float(sum(b["num_targets"] for b in window)))
        dist.all_reduce(targets)
        loss_sum = torch.zeros(())
        for batch in window:
            token_loss = batch_loss_sum(wrapped, batch, head)  # the loop's own loss (target-only head or logits)
            (token_loss * world / targets).backward()  # FSDP averages gradients over ranks
            loss_sum += token_loss.detach()
        if version == 2:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        else:
            wrapped.clip_grad_norm_(cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        dist.all_reduce(loss_sum)
        state.advance(len(window), len(mine))
        losses[state.step] = (loss_sum / targets).item()
        if state.step == args.stop_after:
            checkpoints.save(state)
            break

    adapter_dir = None
    if not args.stop_after:
        adapter_dir = save_adapter(accelerator, backend, wrapped, tokenizer, os.path.join(args.out_dir, "adapter"))
    per_rank = torch.tensor([base_bytes_after_load, base_bytes_after_prepare])
    gathered = [torch.zeros_like(per_rank) for _ in range(world)]
    dist.all_gather(gathered, per_rank)
    if rank == 0:
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "w") as f:
            for step, loss in losses.items():
                f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        with open(os.path.join(args.out_dir, "run.json"), "w") as f:
            json.dump({"world_size": world, "fsdp_version": version, "adapter_gather_bytes": backend.last_gather_bytes,
                       "adapter_dir": adapter_dir, "last_checkpoint": checkpoints.last,
                       "base_bytes_after_load": [int(t[0]) for t in gathered],
                       "base_bytes_after_prepare": [int(t[1]) for t in gathered]}, f)
    dist.destroy_process_group()
    exit_process(0)  # not a plain return: see exit_process (a gloo thread can abort the interpreter's exit)


if __name__ == "__main__":
    main()
