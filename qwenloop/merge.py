"""``qwenloop merge``: a LoRA adapter merged into its base, written as a standalone model.

    qwenloop merge --model BASE_DIR --adapter RUN_DIR/adapter --out MERGED_DIR [--dtype bf16|fp16|fp32]

Every adapted weight becomes ``W + scale * B @ A`` (computed in fp32, rounded once to the output dtype; ``scale`` is
``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA); base parameters trained with the adapter (``bias: all``) replace
the model's. The output has the base's shard layout and a new ``model.safetensors.index.json``, its
``config.json`` (dtype set, a ``quantization_config`` dropped), ``generation_config.json``, the tokenizer the
adapter was trained with and the base's other small files: ``AutoModelForCausalLM.from_pretrained`` and serving
engines (vLLM, TGI, SGLang) load it as they load the base.

Memory: one tensor at a time. Each shard is read tensor by tensor (no memory map), merged, and written straight
into the output shard, whose header is known up front; host RAM stays near the largest tensor (plus its fp32
delta), well under one shard, whatever the model's size (``tests/test_merge.py`` measures it).

QLoRA: qwenloop quantizes the base when it loads it, so a QLoRA adapter's base on disk is the 16-bit checkpoint.
Merging into it is merging into the de-quantized base, in the requested dtype; the command says so, since the
adapter was trained against the NF4-rounded weights and the merged model therefore differs slightly from
"4-bit base + adapter".

Bad input (an adapter that does not fit the model, an output directory that holds a model, a dtype whose merged
model the disk or the RAM cannot hold) is one ``error:`` line and exit code 2, before anything is written; the
output is written into a temporary directory beside ``--out`` and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

from .adapter_files import Adapter, base_name_differs, check_fits, load_adapter
from .errors import CommandParser, UserError
from .tensorfiles import INDEX_FILE, ModelWeights, Reader, Writer, model_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIG_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
SKIPPED_FILES = {"tiny_build.json", INDEX_FILE, "pytorch_model.bin.index.json"}  # tiny_build.json: see qwenloop.tiny
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "tokenizer.model")
MODEL_MARKERS = ("config.json", INDEX_FILE, "model.safetensors", "pytorch_model.bin")


@dataclass
class MergeResult:
    out: str
    dtype: torch.dtype
    shards: int
    pairs: int  # LoRA pairs merged
    replaced: int  # base parameters replaced by trained ones
    seconds: float
    peak_rss_bytes: int  # of this process, interpreter and libraries included
    largest_shard_bytes: int  # of the output
    model_bytes: int  # of the output
    dequantized: bool  # a QLoRA adapter, merged into the 16-bit base


def merge_adapter(model: str, adapter: str, out: str, dtype: str | None = None, overwrite: bool = False,
                  echo=print) -> MergeResult:
    """Merge the LoRA adapter at ``adapter`` into the model at ``model`` and write the result to ``out``.

    ``dtype``: ``"bf16"``, ``"fp16"`` or ``"fp32"``; None keeps the base checkpoint's. ``echo`` receives the
    progress and the notes (QLoRA, a recorded base name that differs) as lines. Raises ``UserError`` on bad input,
    before anything is written."""
    started = time.monotonic()
    weights = model_weights(model)
    config = _read_model_config(model)
    lora = load_adapter(adapter)
    check_fits(lora, weights)
    out_dtype = DTYPES[dtype] if dtype else _storage_dtype(weights)
    out = os.path.abspath(out)
    _check_out(out, model, lora.directory, overwrite)
    _check_capacity(weights, lora, out_dtype, out, dtype or CONFIG_NAMES.get(out_dtype, str(out_dtype)))
    for note in _notes(lora, model, out_dtype):
        echo(f"note: {note}")

    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        stats = _write_shards(weights, lora, out_dtype, tmp, echo)
        _write_side_files(model, lora, config, out_dtype, tmp, weights)
        _fsync_tree(tmp)
        _put_in_place(tmp, out)
    except OSError as e:
        raise UserError(f"merge: could not write {out} ({e.strerror or e}: {e.filename or tmp}); nothing was written "
                        f"there; free disk space or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = MergeResult(out, out_dtype, len(weights.files), stats["pairs"], stats["replaced"],
                         time.monotonic() - started, peak_rss_bytes(), stats["largest"], stats["total"],
                         dequantized=lora.quantized_bits > 0)
    echo(f"merged {result.pairs} LoRA weights into {model} -> {out} ({result.shards} shard(s), "
         f"{CONFIG_NAMES[out_dtype]}, {result.model_bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s; "
         f"peak RSS of this process {result.peak_rss_bytes / 2**20:.0f} MiB")
    return result


# --------------------------------------------------------------------------------------------------
# checks, all before anything is written
# --------------------------------------------------------------------------------------------------


def _read_model_config(model: str) -> dict:
    path = os.path.join(model, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model}: cannot read config.json ({str(e).splitlines()[0]}); give a model directory")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise UserError(f"--model {model}: its weights are stored {method}-quantized; merge needs the 16-bit checkpoint "
                        f"they were quantized from (what qwenloop trains QLoRA on): pass that as --model")
    return config


def _storage_dtype(weights: ModelWeights) -> torch.dtype:
    """The dtype most of the base's floating-point bytes are stored in."""
    count = Counter()
    for info in weights.tensors.values():
        if info.dtype in CONFIG_NAMES:
            count[info.dtype] += info.nbytes
    return count.most_common(1)[0][0] if count else torch.float32


def _check_out(out: str, model: str, adapter_dir: str, overwrite: bool) -> None:
    for source, what in ((model, "--model"), (adapter_dir, "--adapter")):
        src = os.path.realpath(source)
        if os.path.realpath(out) == src or os.path.realpath(out).startswith(src + os.sep):
            raise UserError(f"--out {out}: is (inside) the {what} directory; write the merged model somewhere else")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out}: exists and is not a directory; choose a new directory")
    if os.path.isdir(out) and os.listdir(out):
        entries = os.listdir(out)
        if not any(m in entries for m in MODEL_MARKERS) and not any(e.endswith(".safetensors") for e in entries):
            raise UserError(f"--out {out}: holds other files ({sorted(entries)[0]}, ...); choose a new or empty directory")
        if not overwrite:
            raise UserError(f"--out {out}: already holds a model; pass --overwrite to replace it, or choose another --out")
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: {parent} is not writable; choose another --out")


def _check_capacity(weights: ModelWeights, lora: Adapter, out_dtype: torch.dtype, out: str, dtype_name: str) -> None:
    """The disk must take the merged model in ``out_dtype``, and RAM the largest tensor's merge."""
    needed = weights.nbytes(out_dtype)
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if needed * 1.01 + 2**20 > free:
        raise UserError(f"--dtype {dtype_name}: the merged model is {needed / 2**30:.2f} GiB and {parent} has "
                        f"{free / 2**30:.2f} GiB free; free space, choose a smaller --dtype or another --out")
    working, name = _largest_working_set(weights, lora, out_dtype)
    available = available_ram()
    if available is not None and working > available:
        raise UserError(f"--dtype {dtype_name}: merging {name} needs {working / 2**30:.2f} GiB of RAM and this machine "
                        f"has {available / 2**30:.2f} GiB available; free memory or choose a smaller --dtype")


def _largest_working_set(weights: ModelWeights, lora: Adapter, out_dtype: torch.dtype) -> tuple[int, str]:
    """Bytes one tensor needs while it is merged: as read, its fp32 delta (adapted ones), as written."""
    out_size = torch.empty((), dtype=out_dtype).element_size()
    best = (0, "")
    for name, info in weights.tensors.items():
        size = info.nbytes + info.numel * (out_size + (4 if name in lora.pairs else 0))
        best = max(best, (size, name))
    return best


def available_ram() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def _notes(lora: Adapter, model: str, out_dtype: torch.dtype) -> list[str]:
    notes = []
    if lora.quantized_bits:
        quant = (lora.run_config or {}).get("quantization") or {}
        kind = f"{lora.quantized_bits}-bit" + (f" {quant.get('quant_type')}" if lora.quantized_bits == 4 else "")
        notes.append(f"QLoRA adapter (trained on a {kind} quantized base): merged into the de-quantized base (the "
                     f"unquantized weights in {model}) in {CONFIG_NAMES[out_dtype]}; the adapter learned against the "
                     f"quantized weights, so the merged model's outputs differ slightly from quantized base + adapter")
    if base_name_differs(lora, model):
        notes.append(f"the adapter records its base as {lora.base_name}, merged into {model} (names and shapes match)")
    return notes


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def _write_shards(weights: ModelWeights, lora: Adapter, out_dtype: torch.dtype, tmp: str, echo) -> dict:
    stats = {"pairs": 0, "replaced": 0, "largest": 0, "total": 0}
    weight_map = {}
    for number, file in enumerate(weights.files, start=1):
        names = weights.in_file(file)
        layout = [(n, _out_dtype(weights.tensors[n].dtype, out_dtype), weights.tensors[n].shape) for n in names]
        writer = Writer(os.path.join(tmp, file), layout, metadata={"format": "pt"})
        merged = 0
        try:
            with Reader(os.path.join(weights.directory, file), weights.tensors) as reader:
                for name, dtype, _ in layout:
                    tensor, touched = _merged_tensor(reader.read(name), name, lora)
                    writer.write(name, tensor.to(dtype))
                    merged += touched
                    del tensor  # one tensor alive at a time
            writer.close()
        except BaseException:
            writer.abort()
            raise
        size = os.path.getsize(os.path.join(tmp, file))
        stats["largest"], stats["total"] = max(stats["largest"], size), stats["total"] + size
        stats["pairs"] += sum(1 for n in names if n in lora.pairs)
        stats["replaced"] += sum(1 for n in names if n in lora.replaced)
        weight_map.update({n: file for n in names})
        echo(f"  [{number}/{len(weights.files)}] {file}: {merged} of its {len(names)} tensors changed")
    if weights.indexed:
        index = {"metadata": {"total_size": weights.nbytes(out_dtype)}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(os.path.join(tmp, INDEX_FILE), index)
    return stats


def _out_dtype(stored: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    return out_dtype if stored.is_floating_point else stored  # integer buffers (none in Qwen) stay as they are


def _merged_tensor(tensor: torch.Tensor, name: str, lora: Adapter) -> tuple[torch.Tensor, int]:
    """The tensor as the merged model holds it (fp32 while merging), and whether the adapter changed it."""
    touched = 0
    if name in lora.replaced:
        tensor, touched = lora.replaced[name], 1
    pair = lora.pairs.get(name)
    if pair is not None:
        delta = pair.delta(lora.fan_in_fan_out)
        tensor = delta.add_(tensor)  # fp32 + stored dtype, in place in the delta: no second fp32 copy of W
        touched = 1
    return tensor, touched


def _write_side_files(model: str, lora: Adapter, config: dict, out_dtype: torch.dtype, tmp: str, weights: ModelWeights) -> None:
    """The base's small files (generation config, licence, README, custom code), the adapter's tokenizer (the one
    it was trained with: its chat template), and config.json with the new dtype."""
    for entry in sorted(os.listdir(model)):
        path = os.path.join(model, entry)
        if os.path.isfile(path) and not entry.endswith(WEIGHT_SUFFIXES) and entry not in SKIPPED_FILES:
            shutil.copy2(path, os.path.join(tmp, entry))
    if os.path.isfile(os.path.join(lora.directory, "tokenizer_config.json")):
        for entry in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(lora.directory, entry)):
                shutil.copy2(os.path.join(lora.directory, entry), os.path.join(tmp, entry))
    config = dict(config)
    config["dtype"] = CONFIG_NAMES[out_dtype]
    config["torch_dtype"] = CONFIG_NAMES[out_dtype]  # the key transformers 4.x (and engines pinned to it) read
    _write_json(os.path.join(tmp, "config.json"), config)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _fsync_tree(root: str) -> None:
    from .storage import fsync_tree

    fsync_tree(root)


def _put_in_place(tmp: str, out: str) -> None:
    """Rename the finished directory to ``out``; a model already there (``--overwrite``) is moved aside first and
    removed only once the new one is in place."""
    old = None
    if os.path.isdir(out) and os.listdir(out):
        old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old:
            os.replace(old, out)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ``VmHWM``, which a test can reset; else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------



def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="qwenloop merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="the adapter directory (output_dir/adapter; a run directory works)")
    p.add_argument("--out", required=True, help="where to write the merged model (a new or empty directory)")
    p.add_argument("--dtype", choices=list(DTYPES), help="the merged model's dtype (default: the base checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    return 0
