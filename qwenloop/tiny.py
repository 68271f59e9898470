"""A tiny random Qwen2 model and a small Qwen-style tokenizer, built locally (no download).

The demo and the tests need a model that loads through exactly the code paths a real Qwen2
checkpoint takes (``AutoTokenizer`` -> ``Qwen2Tokenizer``, ``AutoModelForCausalLM`` ->
``Qwen2ForCausalLM``, ChatML chat template, ``<|im_start|>`` / ``<|im_end|>`` special tokens) but
builds in a few seconds on a laptop CPU. ``build_tiny_model`` makes one; ``ensure_tiny_model`` makes
one only if the directory does not already hold a complete build (a cache for tests and the demo).

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a built-in,
deterministic corpus (the same generator that writes ``examples/data/demo.jsonl``), with Qwen2's own
normalizer (NFC), pre-tokenizer (Qwen's split regex + ByteLevel) and decoder (ByteLevel), so every
byte string is representable and ``decode(encode(text)) == text`` for NFC-normalized text (all
ASCII). The special tokens come after the BPE vocabulary, as in Qwen: ``<|endoftext|>`` (pad, and
bos in the model config), ``<|im_start|>``, ``<|im_end|>`` (eos).

Building is deterministic: two builds with the same arguments give byte-identical
``tokenizer.json`` and identical weights. A build is written to a temporary directory next to the
target and renamed into place at the end, so a crashed build never leaves a half directory behind.

This module also holds the demo-conversation generator (``demo_conversations``): a small set of
template tasks (repeat, uppercase, reverse, counting, a capitals table, ...) whose answers follow
from the question, so that LoRA on the tiny random model visibly learns them within ~100 steps.
It is stdlib only; torch / transformers / tokenizers are imported inside the build functions, so
``examples/data/make_demo_data.py`` can import the generator cheaply.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .chat_template import ENDOFTEXT, IM_END, IM_START, QWEN_CHAT_TEMPLATE
from .errors import UserError

__all__ = [
    "build_tiny_model",
    "ensure_tiny_model",
    "is_tiny_model_dir",
    "demo_conversations",
    "DEFAULT_SYSTEM_PROMPT",
]

# Bump when the corpus, the tokenizer pipeline or the model recipe changes: ensure_tiny_model then
# rebuilds a cached directory made by an older version instead of returning it.
TINY_FORMAT_VERSION = 1
MARKER_FILE = "tiny_build.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_FILE)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # what QWEN_CHAT_TEMPLATE inserts
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids: base vocab, base vocab + 1, base vocab + 2
MAX_POSITION_EMBEDDINGS = 1024
LM_HEAD_INIT_STD = 0.2  # see _build_into; every other weight uses Qwen2's initializer_range (0.02)

# Qwen2's pre-tokenizer split regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
# The tokenizer must be trained with the same pipeline that Qwen2Tokenizer rebuilds at load time:
# transformers 5 re-creates the normalizer / pre-tokenizer / decoder of a Qwen2Tokenizer from its
# own __init__ and takes only vocab, merges and post-processor from tokenizer.json.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# --------------------------------------------------------------------------------------------------
# Demo conversations (stdlib only)
# --------------------------------------------------------------------------------------------------

WORDS = (
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple",
    "apple", "river", "stone", "cloud", "tiger", "house", "bread", "music",
    "garden", "window", "candle", "rocket", "forest", "silver", "pepper", "dragon",
)
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"),
)
ANIMAL_SOUNDS = (
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"),
    ("sheep", "baa"), ("owl", "hoot"), ("lion", "roar"), ("bee", "buzz"),
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant.",
    "Answer in as few words as possible.",
)
AGAIN_PROMPTS = ("Say that again.", "Once more, please.")


def _task_repeat(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(WORDS, 2)
    return f"Repeat twice: {a} {b}", f"{a} {b} {a} {b}"


def _task_upper(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Uppercase: {w}", w.upper()


def _task_reverse(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.sample(WORDS, 3)
    return f"Reverse: {a} {b} {c}", f"{c} {b} {a}"


def _task_capital(rng: random.Random) -> tuple[str, str]:
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", f"The capital of {country} is {city}."


def _task_sound(rng: random.Random) -> tuple[str, str]:
    animal, sound = rng.choice(ANIMAL_SOUNDS)
    return f"What does a {animal} say?", f"A {animal} says {sound}."


def _task_count(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(1, 15)
    stop = start + rng.randint(2, 5)
    return f"Count from {start} to {stop}.", " ".join(str(i) for i in range(start, stop + 1))


def _task_next(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 98)
    return f"What number comes after {n}?", str(n + 1)


_TASKS = (_task_repeat, _task_upper, _task_reverse, _task_capital, _task_sound, _task_count, _task_next)


def demo_conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` short conversations in OpenAI ``messages`` format, deterministic for a given ``seed``.

    Each has an optional system turn (40%) and one to three user/assistant exchanges (60% / 30% /
    10%). An exchange is a template task whose answer follows from the question; a follow-up turn may
    be "Say that again." whose answer copies the previous assistant turn (tests multi-turn masking).
    """
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        turns = rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
        last_answer = None
        for t in range(turns):
            if t > 0 and last_answer is not None and rng.random() < 0.3:
                user, answer = rng.choice(AGAIN_PROMPTS), last_answer
            else:
                user, answer = rng.choice(_TASKS)(rng)
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": answer})
            last_answer = answer
        out.append({"messages": messages})
    return out


def _tokenizer_corpus() -> list[str]:
    """Text the BPE is trained on: rendered demo-style conversations (without the special tokens,
    which are added after training) plus some general English / ASCII so merges are not all demo."""
    texts = []
    for conv in demo_conversations(800, seed=1234):
        messages = conv["messages"]
        parts = []
        if messages[0]["role"] != "system":
            parts.append(f"system\n{DEFAULT_SYSTEM_PROMPT}\n")
        parts.extend(f"{m['role']}\n{m['content']}\n" for m in messages)
        texts.append("".join(parts))
    texts.extend(_GENERAL_TEXT.strip().split("\n\n") * 4)
    return texts


_GENERAL_TEXT = """
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!

This is a tiny tokenizer for tests. It splits text into bytes, then merges the most frequent pairs.
Numbers like 0 1 2 3 4 5 6 7 8 9, 10, 42 and 2024 are split into single digits, as in Qwen.

def train(model, data):
    for step, batch in enumerate(data):
        loss = model(**batch).loss
        loss.backward()
    return {"loss": loss.item(), "step": step}

Punctuation and symbols: ( ) [ ] { } < > = + - * / % & | ^ ~ ` ' " , . ; : ? ! @ # $ _ \\

What is the answer? The answer is short. Please answer the question in one word.
"""

# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def _build_params(
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    seed: int,
) -> dict[str, Any]:
    return {
        "format_version": TINY_FORMAT_VERSION,
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "intermediate_size": int(intermediate_size),
        "num_layers": int(num_layers),
        "num_heads": int(num_heads),
        "num_kv_heads": int(num_kv_heads),
        "seed": int(seed),
    }


def _validate(p: dict[str, Any]) -> None:
    if p["vocab_size"] < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"tiny model: vocab_size={p['vocab_size']} is too small; byte-level BPE needs at least 260")
    if p["hidden_size"] % p["num_heads"]:
        raise UserError(f"tiny model: hidden_size={p['hidden_size']} is not divisible by num_heads={p['num_heads']}")
    if p["num_heads"] % p["num_kv_heads"]:
        raise UserError(f"tiny model: num_heads={p['num_heads']} is not divisible by num_kv_heads={p['num_kv_heads']}")
    if (p["hidden_size"] // p["num_heads"]) % 2:
        raise UserError("tiny model: head dim (hidden_size / num_heads) must be even for rotary embeddings")
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        if p[key] < 1:
            raise UserError(f"tiny model: {key}={p[key]} must be positive")


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE with Qwen2's pipeline, wrapped as a ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)

    model_json = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    base = len(vocab)
    for i, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = base + i

    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITION_EMBEDDINGS,
        chat_template=QWEN_CHAT_TEMPLATE,
        errors="replace",
    )
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != [base, base + 1, base + 2]:  # pragma: no cover - guards a transformers behaviour change
        raise RuntimeError(f"tiny tokenizer: special tokens got ids {ids}, expected {[base, base + 1, base + 2]}")
    return tok


def _build_into(tmp: Path, p: dict[str, Any]) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = _train_tokenizer(p["vocab_size"])
    tok.save_pretrained(tmp)

    endoftext_id, _, im_end_id = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    config = Qwen2Config(
        # At least len(tok), rounded up to a multiple of 8: real Qwen checkpoints also have more
        # embedding rows (151936) than tokens (151665).
        vocab_size=-(-max(len(tok), p["vocab_size"]) // 8) * 8,
        hidden_size=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_layers"],
        num_attention_heads=p["num_heads"],
        num_key_value_heads=p["num_kv_heads"],
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        max_window_layers=p["num_layers"],
        tie_word_embeddings=False,
        bos_token_id=endoftext_id,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
        use_cache=True,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(p["seed"])
        model = Qwen2ForCausalLM(config)
        # A wider output head than initializer_range: the final norm gives hidden states of RMS 1, so
        # with std 0.02 rows no logit can exceed ~1.3 and LoRA (which cannot train lm_head) could
        # never make a confident prediction. With 0.2 the demo's loss falls ~7.8 -> ~3.8 in 100 steps.
        torch.nn.init.normal_(model.lm_head.weight, mean=0.0, std=LM_HEAD_INIT_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext_id,
        eos_token_id=[im_end_id, endoftext_id],
        pad_token_id=endoftext_id,
    )
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars are noise in test logs
    try:
        model.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (tmp / "README.md").write_text(
        "Tiny random Qwen2 model built by qwenloop.tiny.build_tiny_model (for demos and tests; "
        "its weights are random, its outputs meaningless until fine-tuned).\n"
    )
    # Written last: its presence means the directory is complete.
    (tmp / MARKER_FILE).write_text(json.dumps(p, indent=2, sort_keys=True) + "\n")


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not all((path / name).is_file() for name in _REQUIRED_FILES):
        return None
    return marker if isinstance(marker, dict) else None


def is_tiny_model_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a complete build of this module's current format."""
    marker = _read_marker(Path(path))
    return marker is not None and marker.get("format_version") == TINY_FORMAT_VERSION


_NOT_OURS = "{out} exists, is not empty and is not a tiny-model build; delete it or choose another directory"


def _make_tmp(out: Path) -> Path:
    """A fresh temporary directory next to ``out`` (same filesystem, so the final rename is atomic)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the result may be a cache shared between users
    return tmp


def _install(tmp: Path, out: Path, p: dict[str, Any], *, replace: bool) -> Path:
    """Rename the finished build ``tmp`` to ``out``. Losing a race to an equal build is fine."""
    for _ in range(5):
        try:
            os.rename(tmp, out)  # atomic; also replaces an empty directory
            return out
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _read_marker(out) == p:  # another process (or an earlier call) built the same thing
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        # Only ever replace something this module made (never a user's unrelated directory).
        if not replace or not (out / MARKER_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"{out} exists and is not a complete tiny-model build with these settings; "
                "delete it or choose another directory"
            )
        # Move the old directory aside (atomic), then retry the rename; delete the old one after.
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.rename(out, trash / out.name)
        except FileNotFoundError:
            pass  # someone else moved it first: just retry
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"could not install the tiny model at {out}: the directory keeps changing")


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Build a tiny random ``Qwen2ForCausalLM`` and its tokenizer into ``out_dir``; return the path.

    ``vocab_size`` is the tokenizer size aimed at (BPE vocabulary + 3 special tokens) and the model's
    embedding size (rounded up to a multiple of 8). The built-in corpus supports about 890 tokens, so
    a larger ``vocab_size`` gives that many tokens and ``vocab_size`` embedding rows, like real Qwen
    checkpoints whose embedding is larger than the tokenizer. The directory loads with
    ``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` (float32,
    safetensors). An existing ``out_dir`` is replaced if it is empty or an earlier tiny-model build
    (anything else is a ``UserError``, never deleted). The build happens in a temporary directory next
    to ``out_dir`` that is renamed into place at the end.
    """
    out = Path(out_dir).absolute()
    p = _build_params(vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, seed)
    _validate(p)
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise UserError(_NOT_OURS.format(out=out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp(out)
    try:
        _build_into(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _install(tmp, out, p, replace=True)


_DEFAULTS = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "seed": 0,
}


def ensure_tiny_model(out_dir: str | os.PathLike, **build_kwargs: Any) -> Path:
    """Return ``out_dir`` if it already holds a complete build (same settings, same format version),
    else build it there. Safe when several processes call it at once: each builds in its own temp
    directory and the losers of the final rename discard theirs.

    ``build_kwargs`` are ``build_tiny_model``'s keyword arguments. A complete build made with other
    settings is a ``UserError`` (not silently replaced); one made by an older version of this module
    is rebuilt.
    """
    out = Path(out_dir).absolute()
    p = _build_params(**{**_DEFAULTS, **build_kwargs})
    _validate(p)
    marker = _read_marker(out)
    if marker == p:
        return out
    if marker is not None and marker.get("format_version") == TINY_FORMAT_VERSION:
        raise UserError(
            f"{out} holds a tiny model built with other settings ({_diff(marker, p)}); "
            "delete it or choose another directory"
        )
    # Missing, empty, or an older format: build (replacing only what this module made before).
    if out.exists() and marker is None and any(out.iterdir()):
        raise UserError(_NOT_OURS.format(out=out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp(out)
    try:
        _build_into(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _install(tmp, out, p, replace=marker is not None)



def _diff(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """'key=found (asked for wanted)' for each setting that differs."""
    keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    return ", ".join(f"{k}={found.get(k)!r} (asked for {wanted.get(k)!r})" for k in keys)
