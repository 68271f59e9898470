"""One rank of a 2-rank torch-FSDP training on CPU/gloo (run by torchrun from test_fsdp.py).

accelerate refuses FSDP on CPU, so this drives qwenloop's own pieces (config, data, model loading,
the loss of `train.py`, the FSDP wrap policy and adapter gather of `distributed.py`) with torch's
FSDP directly, and splits the data across ranks exactly as accelerate's dataloader shard does.
Writes losses.json, run.json and adapter/ into OUT_DIR on rank 0.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py CONFIG.yaml {1|2} OUT_DIR
"""

import json
import os
import sys
import types

import torch
import torch.distributed as dist

from qwenloop import TrainConfig
from qwenloop.adapter import save_adapter
from qwenloop.data import build_dataset, make_dataloader
from qwenloop.distributed import FSDPBackend
from qwenloop.model import load_model, load_tokenizer
from qwenloop.loss import count_targets, token_loss_sum
from qwenloop.train import _make_scheduler


def main(config_path: str, version: int, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig.from_yaml(config_path)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    data = build_dataset(cfg.train_file, tokenizer, cfg)
    fp32 = types.SimpleNamespace(mixed_precision="no", check_quantization=lambda bits: None,
                                 from_pretrained_kwargs=lambda quantized: {}, load_on_meta=lambda quantized: False)
    model = load_model(cfg, fp32)

    # The same FSDPBackend the accelerate path uses, with a stand-in for the accelerator it reads from.
    fake_accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=version, auto_wrap_policy=None)),
        mixed_precision="no", num_processes=world, is_main_process=rank == 0,
        unwrap_model=lambda wrapped_model: model, wait_for_everyone=dist.barrier,
    )
    backend = FSDPBackend(fake_accelerator)
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:  # one unit per decoder layer, as accelerate does
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        backend.before_prepare(model)
        wrapped = FSDP(model, auto_wrap_policy=fake_accelerator.state.fsdp_plugin.auto_wrap_policy,
                       use_orig_params=True, device_id=torch.device("cpu"))

    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    scheduler = _make_scheduler(cfg.lr_scheduler, optimizer, cfg.warmup_steps, cfg.max_steps)
    loader = make_dataloader(data, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.seed, shuffle=True)
    loader.sampler.set_epoch(0)
    mine = [b for i, b in enumerate(loader) if i % world == rank]  # accelerate's BatchSamplerShard order

    gas, losses = cfg.gradient_accumulation_steps, []
    wrapped.train()
    for step in range(cfg.max_steps):
        window = mine[step * gas:(step + 1) * gas]
        targets = torch.tensor(float(sum(count_targets(b) for b in window)))
        dist.all_reduce(targets)
        loss_sum = torch.zeros(())
        for batch in window:
            logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            token_loss = token_loss_sum(logits, batch["labels"])
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
        losses.append((loss_sum / targets).item())

    adapter_dir = save_adapter(fake_accelerator, backend, wrapped, tokenizer, os.path.join(out_dir, "adapter"))
    if rank == 0:
        with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
            for i, loss in enumerate(losses, start=1):
                f.write(json.dumps({"step": i, "loss": loss}) + "\n")
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump({"world_size": world, "adapter_gather_bytes": backend.last_gather_bytes, "adapter_dir": adapter_dir}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
