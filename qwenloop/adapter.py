"""Writing the LoRA adapter in PEFT's format, and checking what was written.

``output_dir/adapter/`` gets ``adapter_model.safetensors`` + ``adapter_config.json`` (loadable by
``PeftModel.from_pretrained``) and the tokenizer files. Only the main process writes, after the
backend gathered full tensors on every rank. The directory is written under a temporary name, checked,
fsynced and renamed into place, so a crash never leaves a half-written adapter where a good one was.

A write that fails (disk full, unwritable directory) ends the run on every rank with one line
(``UserError``, exit code 2): the temporary directory is removed, ``adapter/`` is as it was (in a run,
empty: ``train`` moved an earlier run's adapter aside when it started), and the line says so.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil

from safetensors import safe_open

from . import storage
from .errors import UserError
from .agreement import any_rank
from .model import expected_adapter_shapes

ADAPTER_FILE = "adapter_model.safetensors"


def save_adapter(accelerator, backend, model, tokenizer, out_dir: str) -> str | None:
    """Gather (collective), write and verify (main process), agree on the outcome (collective).
    Returns the directory on the main process, None on the others."""
    state = backend.adapter_state_dict(model)  # every rank takes part in the gather
    problem, crash = None, None
    if accelerator.is_main_process:
        try:
            problem = _publish(accelerator.unwrap_model(model), state, tokenizer, out_dir)
        except Exception as e:  # a bug (e.g. the shape check): still reach the agreement, so no rank waits forever
            problem, crash = f"{type(e).__name__} on the main process", e
    failed = any_rank(accelerator, problem is not None)
    if crash is not None:
        raise crash
    if failed:
        raise UserError(problem or f"adapter: the main process could not write {out_dir} (see its error)")
    return out_dir if accelerator.is_main_process else None


def _publish(peft_model, state: dict, tokenizer, out_dir: str) -> str | None:
    """Write the adapter into ``out_dir``; None when it is there, else the one-line error to stop with."""
    _remove_unfinished_writes(out_dir)
    try:
        _write_and_replace(peft_model, state, tokenizer, out_dir)
        return None
    except OSError as e:
        return _failure_message(out_dir, e)


def _write_and_replace(peft_model, state: dict, tokenizer, out_dir: str) -> None:
    """Everything into a temporary directory, checked and fsynced, then renamed to ``out_dir``. On any error the
    temporary directory is removed and ``out_dir`` is as it was."""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_peft_adapter(peft_model, state, tmp)
        tokenizer.save_pretrained(tmp)
        verify_adapter(tmp, expected_adapter_shapes(peft_model))
        storage.fsync_tree(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; removed after a failure


def _failure_message(out_dir: str, error: OSError) -> str:
    what = f"{error.strerror or error}: {error.filename}" if error.filename else str(error)
    if os.path.exists(out_dir):
        left = f"{out_dir} still holds an earlier adapter, intact, which is not this run's"
    else:
        left = "no adapter was written"
    return (f"adapter: could not write {out_dir} ({what}); {left}; {_remedy(error, out_dir)} and run again "
            f"(resume_from: auto continues from the newest checkpoint, if any)")


def _remedy(error: OSError, out_dir: str) -> str:
    if error.errno == errno.EFBIG:
        return ("a file is larger than the filesystem or the file-size limit (ulimit -f) allows: raise the limit, "
                "or choose an output_dir on another filesystem,")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free disk space (or raise the quota)"
    return f"make {os.path.dirname(out_dir) or '.'} writable"


def _remove_unfinished_writes(out_dir: str) -> None:
    """Temporary directories of an earlier save that was killed: never a result, and they hold space."""
    for path in glob.glob(glob.escape(out_dir) + ".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def write_peft_adapter(peft_model, state: dict, directory: str) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` exactly as ``PeftModel.save_pretrained``
    writes them: keys without the adapter name (``...q_proj.lora_A.weight``).

    Written here rather than by ``save_pretrained(state_dict=...)`` because PEFT re-derives the keys
    from the live module tree, which under FSDP1 still holds wrapper modules, and then silently
    writes an empty file (seen with peft 0.21)."""
    import copy

    from safetensors.torch import save

    adapter_name = getattr(peft_model, "active_adapter", "default")
    marker = f".{adapter_name}."
    tensors = {key.replace(marker, "."): tensor.contiguous() for key, tensor in state.items()}
    os.makedirs(directory, exist_ok=True)
    # Serialised in memory (the adapter only: MBs to a few hundred MB) and written by storage, so that a full
    # disk is an OSError naming the file like every other write, not safetensors' own error type.
    storage.write_bytes(os.path.join(directory, ADAPTER_FILE), save(tensors, metadata={"format": "pt"}))
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(directory)


def verify_adapter(directory: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Re-read the safetensors file: every expected tensor present, non-empty, with the config's shape.

    This is what catches the ZeRO-3 "empty adapter" and the FSDP "rank 0's shard only" bugs.
    """
    path = os.path.join(directory, ADAPTER_FILE)
    with safe_open(path, framework="pt") as f:
        found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise AdapterError(f"{path}: {len(missing)} adapter tensors missing, e.g. {missing[0]}")
    for key, shape in found.items():
        if 0 in shape or not shape:
            raise AdapterError(f"{path}: tensor {key} is empty (shape {list(shape)}): the gather before saving failed")
        if key in expected and shape != tuple(expected[key]):
            raise AdapterError(
                f"{path}: tensor {key} has shape {list(shape)}, the model config implies {list(expected[key])} "
                f"(a shard was saved instead of the full tensor)"
            )


class AdapterError(RuntimeError):
    """A written adapter failed its check: a bug or a backend problem, not bad user input."""


def _replace_dir(tmp: str, final: str) -> None:
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if os.path.exists(old):
            os.replace(old, final)  # the earlier adapter back where it was: never a state with neither
        raise
    storage.fsync_dir(os.path.dirname(final) or ".")  # the renames themselves survive a power loss
    shutil.rmtree(old, ignore_errors=True)
