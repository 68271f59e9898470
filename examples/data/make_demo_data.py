"""Write the bundled demo dataset: demo.jsonl (train) and demo_eval.jsonl (eval).

Deterministic (run it again: same bytes). Stdlib only; the generator lives in ``qwenloop.tiny``
(``demo_conversations``), which builds the tiny tokenizer from the same kind of text.

Each line is one conversation in OpenAI ``messages`` format::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

The assistant's answers follow from the question by a fixed template (repeat words, uppercase,
reverse, count, a small table of capitals and animal sounds, "say that again"), so LoRA on the tiny
random model (``qwenloop.tiny``) learns them and the loss visibly falls within ~100 steps on a CPU.
No eval conversation appears verbatim in the training file.

Usage: python examples/data/make_demo_data.py [--out-dir DIR] [--train N] [--eval N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    from qwenloop.tiny import demo_conversations
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(HERE.parents[1]))
    from qwenloop.tiny import demo_conversations

TRAIN_SEED = 0
EVAL_SEED = 1


def _line(conv: dict) -> str:
    return json.dumps(conv, ensure_ascii=False, sort_keys=False)


def make(n_train: int = 300, n_eval: int = 40) -> tuple[list[str], list[str]]:
    train = [_line(c) for c in demo_conversations(n_train, seed=TRAIN_SEED)]
    seen = set(train)
    evals: list[str] = []
    # Draw from a separate stream and skip exact duplicates of training conversations.
    for conv in demo_conversations(n_eval * 4, seed=EVAL_SEED):
        line = _line(conv)
        if line not in seen:
            evals.append(line)
            seen.add(line)
        if len(evals) == n_eval:
            break
    return train, evals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--train", type=int, default=300, help="number of training conversations")
    ap.add_argument("--eval", type=int, default=40, help="number of eval conversations")
    args = ap.parse_args(argv)
    train, evals = make(args.train, args.eval)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in (("demo.jsonl", train), ("demo_eval.jsonl", evals)):
        (args.out_dir / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        print(f"wrote {len(lines)} conversations to {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
