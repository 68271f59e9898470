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


def demo() -> int:
    """Build the tiny model once, train on the bundled data, show generations before and after."""
    from qwenloop import TrainConfig, UserError, train
    from qwenloop.tiny import ensure_tiny_model

    try:
        cfg = TrainConfig.from_yaml(DEMO_CONFIG)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ensure_tiny_model(cfg.model)
    prompts = ["What is the capital of France?", "Repeat twice: red blue"]
    before = [generate(cfg.model, None, [{"role": "user", "content": p}]) for p in prompts]
    result = train(cfg)
    if result.adapter_dir is None:  # not the main process
        return 0
    after = [generate(cfg.model, result.adapter_dir, [{"role": "user", "content": p}]) for p in prompts]
    print(f"\nloss: {result.losses[0]:.3f} at step 1 -> {result.losses[-1]:.3f} at step {result.steps}")
    print(f"adapter: {result.adapter_dir}")
    print(f"metrics: {os.path.join(result.output_dir, 'metrics.jsonl')}")
    for prompt, old, new in zip(prompts, before, after):
        print(f"prompt: {prompt!r}\n  before training: {old!r}\n  after training:  {new!r}")
    return 0


def generate(model_dir: str, adapter_dir, messages, max_new_tokens: int = 24) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        exit_process(demo())
    if args[0] != "--config" or len(args) < 2:
        print("usage: finetune.py [--config CONFIG.yaml [--key value ...]]", file=sys.stderr)
        sys.exit(2)
    exit_process(qwenloop_main(["train", args[1], *args[2:]]))  # sys.exit, but safe for multi-process CPU runs
