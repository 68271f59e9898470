"""safetensors files read and written one tensor at a time, and a model directory's weight index.

``safetensors.safe_open`` memory-maps a file: every page a read touches stays in the process's resident set
until the file is closed, so reading a whole 4 GB shard through it costs 4 GB of RSS. ``qwenloop merge`` has to
keep its footprint at a shard or less on a 72B model, so it reads each tensor with a plain ``readinto`` at the
offset the header gives, and writes its output the same way: header first (all shapes and dtypes are known up
front), then each tensor's bytes as soon as it is ready. The format (an 8-byte little-endian header length, a
JSON header of ``{name: {dtype, shape, data_offsets}}`` and ``__metadata__``, then the data) is the one
documented at https://huggingface.co/docs/safetensors; files written here are read back by ``safe_open`` and
``from_pretrained`` in the tests.

Imports nothing of training: ``merge`` and ``generate`` read model directories through it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass

import torch

from .errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts


@dataclass(frozen=True)
class TensorInfo:
    file: str  # absolute path of the file holding it
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """``({name: TensorInfo}, metadata)`` of one safetensors file; reads the header only.

    A file shorter than its header says (an interrupted download or copy) is a one-line ``UserError``."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, "shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER:
                raise _damaged(path, f"header length {length} is not plausible")
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    base = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, which qwenloop cannot read")
        begin, end = entry["data_offsets"]
        tensors[name] = TensorInfo(os.path.abspath(path), DTYPES[entry["dtype"]], tuple(entry["shape"]), base + begin, base + end)
        if base + end > size:
            raise _damaged(path, f"it ends at byte {size}, before the data of {name}")
    return tensors, metadata


def _damaged(path: str, why: str) -> UserError:
    return UserError(f"{path}: cannot be read as safetensors ({why}): it is damaged or incomplete; copy it again")


class Reader:
    """One open safetensors file; ``read(name)`` copies one tensor into fresh memory (no mmap)."""

    def __init__(self, path: str, tensors: dict[str, TensorInfo]):
        self.path, self.tensors = path, tensors
        self._file = open(path, "rb")

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        self._file.seek(info.start)
        if info.nbytes and self._file.readinto(memoryview(buffer.numpy())) != info.nbytes:
            raise _damaged(self.path, f"short read of {name}")
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Writer:
    """A safetensors file whose header is written first; ``write(name, tensor)`` appends tensors in the order
    the header lists them. ``close()`` checks that every announced tensor came."""

    def __init__(self, path: str, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
        if sys.byteorder != "little":  # safetensors is little-endian; raw bytes are written as they lie in memory
            raise UserError("qwenloop writes safetensors on little-endian machines only")
        header, offset = {}, 0
        for name, dtype, shape in layout:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header = {"__metadata__": metadata, **header}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        self.path, self._expected = path, [(name, dtype, tuple(shape)) for name, dtype, shape in layout]
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self._expected[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise RuntimeError(f"{self.path}: got {name} {tensor.dtype} {list(tensor.shape)}, the header announced {want}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            self._file.close()
            raise RuntimeError(f"{self.path}: {len(self._expected) - self._next} announced tensors were not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------------------------------
# a model directory's weights
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelWeights:
    directory: str
    files: list[str]  # shard file names in the order the index lists them (one for an unsharded model)
    tensors: dict[str, TensorInfo]
    indexed: bool  # whether the directory has model.safetensors.index.json

    def in_file(self, file: str) -> list[str]:
        path = os.path.join(self.directory, file)
        return [name for name, info in self.tensors.items() if info.file == os.path.abspath(path)]

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of all tensors, stored as they are or with every floating tensor in ``dtype``."""
        return sum(_size_as(info, dtype) for info in self.tensors.values())

    def file_nbytes(self, file: str) -> int:
        return sum(self.tensors[name].nbytes for name in self.in_file(file))


def _size_as(info: TensorInfo, dtype: torch.dtype | None) -> int:
    if dtype is None or not info.dtype.is_floating_point:
        return info.nbytes
    return info.numel * torch.empty((), dtype=dtype).element_size()


def model_weights(directory: str) -> ModelWeights:
    """The safetensors weights of a model directory (headers only), through its index when it has one."""
    if not os.path.isdir(directory):
        raise UserError(f"--model {directory}: not a directory; give a local model directory (config.json + *.safetensors)")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        return _indexed_weights(directory, index_path)
    if os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        tensors, _ = read_header(os.path.join(directory, SINGLE_FILE))
        return ModelWeights(directory, [SINGLE_FILE], tensors, indexed=False)
    others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
    found = f" (it has {others[0]}: convert it to safetensors first)" if others else ""
    raise UserError(f"--model {directory}: no {SINGLE_FILE} or {INDEX_FILE}{found}; qwenloop reads safetensors weights")


def _indexed_weights(directory: str, index_path: str) -> ModelWeights:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index_path}: not a safetensors index with a weight_map ({type(e).__name__}); copy it again")
    files = list(dict.fromkeys(weight_map.values()))
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        path = os.path.join(directory, file)
        if not os.path.isfile(path):
            raise UserError(f"{index_path} lists {file}, which is missing from {directory}; copy the model again")
        in_file, _ = read_header(path)
        for name, info in in_file.items():
            if weight_map.get(name) == file:
                tensors[name] = info
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise UserError(f"{index_path}: tensor {missing[0]} is not in {weight_map[missing[0]]} "
                        f"({len(missing)} listed tensors missing); the model directory is incomplete, copy it again")
    return ModelWeights(directory, files, tensors, indexed=True)
