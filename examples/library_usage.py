"""Using qwenloop as a library from your own script.

    python examples/library_usage.py                       # single process, CPU demo data
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml examples/library_usage.py

The config can come from a YAML file, a dict, or be built field by field; `train` returns the
per-step losses, the adapter directory and the trained (unwrapped) PEFT model.
"""

from qwenloop import LoraSettings, TrainConfig, train
from qwenloop.cli import exit_process
from qwenloop.tiny import ensure_tiny_model


def main() -> None:
    model_dir = str(ensure_tiny_model("outputs/tiny-qwen2"))
    cfg = TrainConfig(
        model=model_dir,
        train_file="examples/data/demo.jsonl",
        output_dir="outputs/library-demo",
        overwrite_output_dir=True,
        max_steps=20,
        micro_batch_size=8,
        learning_rate=2e-3,
        max_seq_len=128,
        gradient_checkpointing=False,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
    )
    cfg.validate()
    result = train(cfg)
    if result.adapter_dir:  # the main process
        print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; adapter in {result.adapter_dir}")


if __name__ == "__main__":
    main()
    exit_process(0)  # a plain exit can abort a multi-process CPU (gloo) run: README, "Multi-process runs on CPU"
