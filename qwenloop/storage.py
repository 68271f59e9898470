"""Durable files: what every writer of checkpoints, adapters and optimizer states shares.

Sits below ``checkpoint``, ``adapter``, ``distributed`` and ``model`` (imports none of them): tensors are
written flushed and fsynced, and read back with ``weights_only=True`` (never arbitrary pickled objects).
"""

from __future__ import annotations

import os

import torch

from . import faults


def save_torch(obj, path: str) -> None:
    """``torch.save`` to ``path``, flushed to disk (fsync) before returning."""
    faults.disk_full(path)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_torch(path: str):
    """``torch.load`` restricted to tensors and plain containers: never arbitrary pickled objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) and fsync it."""
    faults.disk_full(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (files written by other ranks or libraries too)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def strip_wrapper_prefixes(name: str) -> str:
    """Parameter/module name as in the plain model, without FSDP / checkpoint / compile / DDP wrappers (the
    names files are written and read with)."""
    parts = [p for p in name.split(".") if p not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")]
    if parts and parts[0] == "module":  # DDP
        parts = parts[1:]
    return ".".join(parts)
