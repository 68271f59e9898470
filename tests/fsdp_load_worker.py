"""One rank of a 2-rank load under FSDP with cpu-ram-efficient loading (fsdp.yaml's default):
qwenloop's load_model reads the checkpoint on the first rank only and builds the others on the meta
device, real buffers (RoPE) included. Prints `RANK r BASE_BYTES n META_PARAMS m REAL_BUFFERS b`.

    torchrun --nproc_per_node 2 tests/fsdp_load_worker.py MODEL_DIR
"""

import sys
import types

import torch.distributed as dist

from qwenloop import TrainConfig
from qwenloop.distributed import FSDPBackend, local_param_bytes
from qwenloop.model import load_model


def main(model_dir: str) -> None:
    dist.init_process_group("gloo")  # as the Accelerator does before the model loads
    rank = dist.get_rank()
    accelerator = types.SimpleNamespace(  # what FSDPBackend reads of accelerate's FSDP state
        state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=2, cpu_ram_efficient_loading=True)),
        mixed_precision="no", is_local_main_process=rank == 0,
    )
    backend = FSDPBackend(accelerator)
    cfg = TrainConfig.from_dict({"model": model_dir, "train_file": "unused.jsonl"})
    model = load_model(cfg, backend)
    meta = sum(p.is_meta for p in model.parameters())
    real_buffers = sum(not b.is_meta for b in model.buffers())
    print(f"RANK {rank} BASE_BYTES {local_param_bytes(model, frozen_only=True)} META_PARAMS {meta} "
          f"REAL_BUFFERS {real_buffers}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
