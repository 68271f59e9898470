"""``qwenloop`` command line: ``train``, and the tools around a run (``plan``, ``doctor``, ``data`` before it; ``plot``,
``compare``, ``generate``, ``merge`` after it), each subcommand's module owning its arguments.

``qwenloop train`` runs in the current process (single process, or one rank when started by
``accelerate launch -m qwenloop train``). Bad input ends with ``error: <one line>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import EXIT_USAGE, RunStopped, UserError

USAGE = """usage: qwenloop train CONFIG.yaml [--key value ...]     fine-tune (e.g. --max_steps 10 --lora.r 8)
       qwenloop plan (--model NAME|DIR --gpu NAME ... | --config my.yaml --accelerate-config X.yaml)   will it fit, how long
       qwenloop doctor --config my.yaml [--accelerate-config X.yaml] [--gpu NAME] [--key value ...]
                                                         every contradiction and risk of a launch, before it loads (exit 2: it would stop)
       qwenloop data FILE [--config my.yaml] [--key value ...] [--sample N] [--max-errors N] [--json]
                                                         every bad record at once, token statistics, a masked sample (no model load; exit 2: training would refuse it)
       qwenloop plot RUN_DIR                             curves.png (loss, lr, tokens/s, grad norm, fp16 loss scale)
       qwenloop compare RUN_DIR RUN_DIR ...              the same job under several backends, side by side
       qwenloop generate --model PATH [--adapter PATH] (--prompt TEXT | --file prompts.jsonl) [--compare]
       qwenloop merge --model PATH --adapter PATH --out PATH [--dtype bf16|fp16|fp32]   LoRA merged, shard by shard
       qwenloop tiny-model DIR                           write the tiny Qwen2 model + tokenizer used by the demo/tests
       qwenloop config-reference                         print every training-config key as a Markdown table"""


AFTER_TRAINING = {"plot": "report", "compare": "compare", "generate": "generate", "merge": "merge"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except UserError as e:
        # One write per line: the ranks of a launch share stderr, and print()'s separate newline let two
        # ranks' lines run into one (a write under PIPE_BUF bytes is atomic).
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return EXIT_USAGE
    except RunStopped as e:  # preempted (SIGTERM/SIGINT) or stopped by the NaN sentinel: a report, no traceback
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command == "train":
        if not rest or rest[0].startswith("--"):
            raise UserError("qwenloop train: the first argument must be a YAML config file, e.g. qwenloop train examples/configs/demo.yaml")
        from .config import TrainConfig
        from .train import train

        cfg = TrainConfig.from_yaml(rest[0], rest[1:])
        result = train(cfg)
        if result.adapter_dir:
            print(f"adapter saved to {result.adapter_dir}")
        return 0
    if command == "tiny-model":
        parser = argparse.ArgumentParser(prog="qwenloop tiny-model")
        parser.add_argument("dir")
        args = parser.parse_args(rest)
        from .tiny import ensure_tiny_model

        print(ensure_tiny_model(args.dir))
        return 0
    if command == "plan":
        from .plan.cli import main as plan_main

        return plan_main(rest)
    if command == "doctor":
        from .doctor import main as doctor_main

        return doctor_main(rest)
    if command == "data":  # qwenloop data: the data checks and statistics of training, without a model
        from .datacli import main as data_main

        return data_main(rest)
    if command in AFTER_TRAINING:  # qwenloop plot / compare / generate / merge: each module owns its arguments
        import importlib

        return importlib.import_module(f".{AFTER_TRAINING[command]}", __package__).main(rest)
    if command == "config-reference":
        from .config import field_docs

        print(config_reference_markdown(field_docs()))
        return 0
    raise UserError(f"unknown command {command!r}; use train, plan, doctor, data, plot, compare, generate, merge, tiny-model or config-reference")


def config_reference_markdown(rows) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, doc in rows:
        lines.append(f"| `{key}` | {type_name} | `{default}` | {doc} |")
    return "\n".join(lines)


def run() -> None:
    """Console-script entry point (``qwenloop``, ``python -m qwenloop``)."""
    exit_process(main())


def exit_process(code: int) -> None:
    """End the process with ``code``.

    A rank of a multi-process CPU run skips the interpreter's finalization (``os._exit`` once output
    is flushed): a gloo worker thread may still be releasing the tensors of the last collective, needs
    the GIL for it, and the interpreter tearing down then aborts the process with "terminate called
    without an active exception" after all its work is done (pytorch/pytorch#190489). Seen here in
    about one 2-rank launch in ten; a process group that is still referenced (FSDP2's device mesh,
    DeepSpeed's groups) outlives ``destroy_process_group``, so destroying it does not prevent this.
    Everything qwenloop writes is closed and fsynced before this point.
    """
    from .distributed import is_multiprocess_cpu

    if is_multiprocess_cpu():
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
