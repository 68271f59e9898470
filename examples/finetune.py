"""Fine-tune a Qwen model with LoRA. The backend is chosen by the accelerate config alone:

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml examples/finetune.py \
        --config examples/configs/qwen2.5-7b-1gpu.yaml --max_steps 100
    python examples/finetune.py            # no arguments: the CPU demo (tiny model, bundled data)

Any training-config key can be overridden after the config: --learning_rate 1e-4 --lora.r 8.
"""

import os
import sys

from qwenloop.cli import exit_process, main as qwenloop_main

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(HERE, "configs", "demo.yaml")
PROMPTS = ["What is the capital of France?", "Repeat twice: red blue"]


def demo() -> int:
    """Build the tiny model once, train on the bundled data, show answers before and after."""
    from qwenloop import TrainConfig, UserError, train
    from qwenloop.generate import generate
    from qwenloop.tiny import ensure_tiny_model

    try:
        cfg = TrainConfig.from_yaml(DEMO_CONFIG)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ensure_tiny_model(cfg.model)
    result = train(cfg)
    if result.adapter_dir is None:  # not the main process
        return 0
    # One load, the adapter switched off for the "before" answer: greedy, so the same every run.
    answers = generate(cfg.model, PROMPTS, result.adapter_dir, compare=True, max_new_tokens=24)
    print(f"\nloss: {result.losses[0]:.3f} at step 1 -> {result.losses[-1]:.3f} at step {result.steps}")
    print(f"adapter: {result.adapter_dir}")
    print(f"metrics: {os.path.join(result.output_dir, 'metrics.jsonl')}")
    for answer in answers:
        print(f"prompt: {answer.prompt!r}\n  before training: {answer.base!r}\n  after training:  {answer.adapted!r}")
    print(f"\nmore: qwenloop generate --model {cfg.model} --adapter {result.adapter_dir} --compare   (a chat)\n"
          f"      qwenloop merge --model {cfg.model} --adapter {result.adapter_dir} --out outputs/demo-merged")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        exit_process(demo())
    if args[0] != "--config" or len(args) < 2:
        print("usage: finetune.py [--config CONFIG.yaml [--key value ...]]", file=sys.stderr)
        sys.exit(2)
    exit_process(qwenloop_main(["train", args[1], *args[2:]]))  # sys.exit, but safe for multi-process CPU runs
