"""``qwenloop generate``: answers of a base model, with or without a LoRA adapter, through its chat template.

    qwenloop generate --model BASE_DIR --adapter RUN_DIR/adapter --prompt "What is the capital of France?"
    qwenloop generate --model BASE_DIR --adapter RUN_DIR/adapter --file eval.jsonl --compare --output answers.jsonl
    qwenloop generate --model BASE_DIR --adapter RUN_DIR/adapter          # in a terminal: a chat

Greedy decoding unless ``--sample`` (then seeded per prompt), so the same command gives the same answers.
``--compare`` answers each prompt twice, adapter off and on, from one loaded model. ``--file`` takes JSONL in
the training formats (``messages``, ``conversations``, ``instruction``/``input``) or ``{"prompt": ...}``; a
conversation that ends with an assistant turn is answered without that turn, which is kept as ``reference``.

The tokenizer (and its chat template) is the one saved with the adapter, which is the one the adapter was trained
with; the base model's otherwise. A QLoRA adapter is applied to the base quantized as in training (``--quantize``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import textwrap
from dataclasses import dataclass

from .errors import CommandParser, UserError
from .inference import GenerationSettings, Generator

__all__ = ["Answer", "generate", "read_prompts", "main"]


@dataclass
class Answer:
    messages: list[dict]  # the conversation answered (without a trailing reference answer)
    base: str | None = None  # the base model's answer (--compare, or no adapter)
    adapted: str | None = None  # the answer with the adapter
    reference: str | None = None  # the answer the prompt file gave, if any

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""


def generate(model: str, prompts, adapter: str | None = None, *, compare: bool = False, system: str | None = None,
             max_new_tokens: int = 256, sample: bool = False, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None, seed: int = 0, device: str = "auto",
             dtype: str = "auto", quantize: str = "auto", trust_remote_code: bool = False) -> list[Answer]:
    """Answer each prompt (a string, a list of ``{"role", "content"}`` turns, or an ``Answer``) with the model, the
    model + adapter, or both (``compare``). Deterministic unless ``sample`` (then per-prompt ``seed``)."""
    if compare and not adapter:
        raise UserError("--compare needs --adapter: it shows the base model's answer beside the adapted one")
    settings = GenerationSettings(max_new_tokens, sample, temperature, top_p, top_k, seed)
    generator = Generator(model, adapter, device=device, dtype=dtype, quantize=quantize,
                          trust_remote_code=trust_remote_code)
    return [answer_one(generator, _as_answer(p, system), settings, compare) for p in prompts]


def answer_one(generator: Generator, answer: Answer, settings: GenerationSettings, compare: bool) -> Answer:
    """Fill ``answer.base`` (without an adapter, or with ``compare``) and ``answer.adapted`` (with an adapter)."""
    if compare or not generator.has_adapter:
        answer.base = generator.answer(answer.messages, settings, use_adapter=False)
    if generator.has_adapter:
        answer.adapted = generator.answer(answer.messages, settings, use_adapter=True)
    return answer


def _as_answer(prompt, system: str | None) -> Answer:
    if isinstance(prompt, Answer):
        answer = prompt
    elif isinstance(prompt, str):
        answer = Answer([{"role": "user", "content": prompt}])
    else:
        answer = Answer([dict(turn) for turn in prompt])
    if system and not (answer.messages and answer.messages[0]["role"] == "system"):
        answer.messages.insert(0, {"role": "system", "content": system})
    return answer


# --------------------------------------------------------------------------------------------------
# prompt files
# --------------------------------------------------------------------------------------------------


def read_prompts(path: str) -> list[Answer]:
    """The prompts of a JSONL file: one conversation per line, in any of the training formats or ``{"prompt"}``."""
    if not os.path.isfile(path):
        raise UserError(f"--file {path}: not found; give a JSONL file with one prompt per line")
    answers = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix that line")
            answers.append(_record_to_answer(record, f"{path}:{lineno}"))
    if not answers:
        raise UserError(f"--file {path}: holds no prompts")
    return answers


ROLES = {role: role for role in ("system", "user", "assistant", "tool")}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}


def _record_to_answer(record, where: str) -> Answer:
    if isinstance(record, str):
        return Answer([{"role": "user", "content": record}])
    if not isinstance(record, dict):
        raise UserError(f"{where}: each line must be a JSON object or string, got {type(record).__name__}")
    if isinstance(record.get("prompt"), str):
        turns = [{"role": "user", "content": record["prompt"]}]
    elif isinstance(record.get("instruction"), str):
        extra = record.get("input")
        turns = [{"role": "user", "content": f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]}]
        if isinstance(record.get("output"), str):
            turns.append({"role": "assistant", "content": record["output"]})
    elif isinstance(record.get("messages"), list):
        turns = [_turn(t, "role", "content", ROLES, where) for t in record["messages"]]
    elif isinstance(record.get("conversations"), list):
        turns = [_turn(t, "from", "value", SHAREGPT_ROLES, where) for t in record["conversations"]]
    else:
        raise UserError(f"{where}: no prompt found (keys {sorted(record)}); use 'prompt', 'messages', "
                        f"'conversations' or 'instruction'")
    reference = turns.pop()["content"] if turns and turns[-1]["role"] == "assistant" else None
    if not turns or turns[-1]["role"] == "system":
        raise UserError(f"{where}: the conversation has no user turn to answer")
    return Answer(turns, reference=reference)


def _turn(turn, role_key: str, content_key: str, roles: dict, where: str) -> dict:
    if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str) or turn.get(role_key) not in roles:
        raise UserError(f"{where}: every turn needs {role_key!r} (one of {sorted(roles)}) and a string {content_key!r}")
    return {"role": roles[turn[role_key]], "content": turn[content_key]}


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def render(answer: Answer, width: int | None = None) -> str:
    """One answer for a terminal: the prompt, then the answer, or base and adapter side by side."""
    lines = [f">>> {printable(answer.prompt)}"]
    if answer.base is not None and answer.adapted is not None:
        lines += side_by_side(("base", answer.base), ("adapter", answer.adapted), width)
    else:
        lines.append(printable(answer.adapted if answer.adapted is not None else answer.base or ""))
    if answer.reference is not None:
        lines.append(f"(reference: {answer.reference})")
    return "\n".join(lines)


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int | None = None) -> list[str]:
    """Two labelled texts in two columns, each wrapped to half the terminal."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    column = max(20, (width - 3) // 2)

    def wrap(title: str, text: str) -> list[str]:
        body = [piece for paragraph in (printable(text).splitlines() or [""])
                for piece in (textwrap.wrap(paragraph, column) or [""])]
        return [title, "-" * min(column, max(len(title), 8))] + body

    a, b = wrap(*left), wrap(*right)
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"{x:<{column}} | {y}".rstrip() for x, y in zip(a, b)]


def printable(text: str) -> str:
    """``text`` with control characters escaped: an undertrained model's answer must not drive the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def to_record(answer: Answer) -> dict:
    record = {"messages": answer.messages}
    for key in ("base", "adapted", "reference"):
        if getattr(answer, key) is not None:
            record[key] = getattr(answer, key)
    return record


# --------------------------------------------------------------------------------------------------
# interactive
# --------------------------------------------------------------------------------------------------


def chat(generator: Generator, settings: GenerationSettings, compare: bool, system: str | None,
         read=input, write=print) -> None:
    """A conversation in the terminal: each turn answered with the history so far (kept per side under
    ``--compare``). ``/reset`` starts over, ``/quit`` or end of input ends."""
    sides = (["base", "adapter"] if compare else ["adapter" if generator.has_adapter else "base"])
    start = [{"role": "system", "content": system}] if system else []
    history = {side: list(start) for side in sides}
    write("type a message; /reset starts a new conversation, /quit (or Ctrl-D) ends")
    while True:
        try:
            text = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            history = {side: list(start) for side in sides}
            write("(new conversation)")
            continue
        if not text.strip():
            continue
        replies = {}
        for side in sides:
            history[side].append({"role": "user", "content": text})
            replies[side] = generator.answer(history[side], settings, use_adapter=side == "adapter")
            history[side].append({"role": "assistant", "content": replies[side]})
        if compare:
            write("\n".join(side_by_side(("base", replies["base"]), ("adapter", replies["adapter"]))))
        else:
            write(printable(replies[sides[0]]))


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------



def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="qwenloop generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base model directory")
    p.add_argument("--adapter", help="a LoRA adapter directory (output_dir/adapter; a run directory works)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", action="append", help="a user message to answer (may be repeated)")
    what.add_argument("--file", help="JSONL of prompts (training formats or {\"prompt\": ...})")
    p.add_argument("--compare", action="store_true", help="show the base model's answer beside the adapter's")
    p.add_argument("--system", help="a system message put before each prompt that has none")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding; uses the "
                   "model's generation_config.json settings unless --temperature/--top-p/--top-k are given")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=0, help="the sampling seed of every prompt (with --sample)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs that have it, fp16 on older ones, fp32 on CPU")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "4bit", "8bit"],
                   help="load the base quantized (bitsandbytes); auto: as the adapter's run trained (QLoRA), else none")
    p.add_argument("--output", help="also write the answers as JSONL to this file")
    p.add_argument("--json", action="store_true", help="print JSONL (one answer per line) instead of text")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with the model")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.compare and not args.adapter:
        raise UserError("--compare needs --adapter: it shows the base model's answer beside the adapted one")
    interactive = not args.prompt and not args.file
    if interactive and not sys.stdin.isatty():
        raise UserError("give --prompt TEXT or --file prompts.jsonl (the interactive mode needs a terminal on stdin)")
    prompts = read_prompts(args.file) if args.file else [Answer([{"role": "user", "content": p}]) for p in args.prompt or []]
    if args.output:
        _check_output(args.output)
    settings = GenerationSettings(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.top_k, args.seed)
    with _quiet_libraries():
        generator = Generator(args.model, args.adapter, device=args.device, dtype=args.dtype, quantize=args.quantize,
                              trust_remote_code=args.trust_remote_code, echo=lambda line: print(line, file=sys.stderr))
        if interactive:
            chat(generator, settings, args.compare, args.system)
            return 0
        records = []
        for prompt in prompts:
            answer = answer_one(generator, _as_answer(prompt, args.system), settings, args.compare)
            records.append(to_record(answer))
            print(json.dumps(records[-1], ensure_ascii=False) if args.json else render(answer) + "\n", flush=True)
    if args.output:
        from .storage import write_text_atomic

        write_text_atomic(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return 0


@contextlib.contextmanager
def _quiet_libraries():
    """No weight-loading progress bars or library deprecation notices between the answers on a terminal (put back
    afterwards: ``main`` may run inside a longer-lived process)."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_output(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"--output {path}: cannot write a file there; give a file path in a writable directory")
