"""Raw training records: read every record of a data file and check each one, so that the ones that cannot be
used are reported together (``file:line: what is wrong; what to do``).

Files: JSONL, JSON (an array, or JSONL content in a ``.json`` file; an array in a ``.jsonl`` file), parquet,
or a ``Dataset.save_to_disk`` directory. JSON(L) text is read by this module, not by pyarrow: pyarrow's
errors carry no line numbers, it skips blank lines (so its row numbers are not line numbers), and it
refuses the whole file for one bad line.
Each record of a JSON(L) file becomes one row ``{where, raw, problem}`` of a ``datasets`` table (``where``:
its true line number, blank lines counted, or its index in the array), cached like the tokenization; what
each record means is ``formats.py``'s business.
"""

from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .formats import EMPTY_STATS, RecordProblem, to_conversation

WHERE, RAW, PROBLEM = "where", "raw", "problem"
UTF16_32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


# --------------------------------------------------------------------------------------------
# files -> raw records
# --------------------------------------------------------------------------------------------


def check_data_path(path: str) -> None:
    """A data file (or saved dataset directory) must exist; run before training by ``qwenloop.checks`` too."""
    if not os.path.exists(path):
        raise UserError(f"{path}: data file not found; set train_file/eval_file to an existing file or directory")


@dataclass
class RawRecords:
    """Every record of one file, unparsed: ``dataset`` rows are ``{where, raw, problem}`` for JSON(L), the
    records themselves for parquet and saved datasets."""

    path: str
    kind: str  # "jsonl", "json", "parquet" or "saved"
    dataset: Any

    @property
    def is_text(self) -> bool:
        return self.kind in ("jsonl", "json")

    def locations(self) -> list[str]:
        """How the report names each row: ``file:line`` for JSONL, ``file: record i`` (from 0) otherwise."""
        if self.kind == "jsonl":
            return [f"{self.path}:{line}" for line in self.dataset[WHERE]]
        return [f"{self.path}: record {i}" for i in range(len(self.dataset))]


def parse_row(row: dict, is_text: bool) -> dict:
    """The record of one row of ``RawRecords.dataset`` (JSON is parsed here, so that a bad line is one record's
    problem). A module function, not a method: ``datasets`` hashes what a mapped function refers to."""
    if not is_text:
        return row
    if row[PROBLEM]:
        raise RecordProblem(row[PROBLEM])
    try:
        record = json.loads(row[RAW])
    except json.JSONDecodeError as e:
        raise RecordProblem(f"malformed JSON ({e.msg} at column {e.colno}); fix or remove that line")
    if not isinstance(record, dict):
        raise RecordProblem(f"a record must be a JSON object, got {_json_kind(record)}; fix or remove it")
    return record


def load_raw(path: str) -> RawRecords:
    """All records of ``path``; a file that holds none, or cannot be read at all, is one ``UserError``."""
    import datasets

    check_data_path(path)
    if os.path.isdir(path):
        return _nonempty(RawRecords(path, "saved", _load_saved(path)))
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        try:
            ds = datasets.load_dataset("parquet", data_files=os.path.abspath(path), split="train")
        except Exception as e:  # noqa: BLE001 - arrow raises many types for a damaged file
            raise UserError(f"{path}: could not be read as parquet ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            f"check the file, or convert it to JSONL")
        return _nonempty(RawRecords(path, "parquet", ds))
    if ext not in (".jsonl", ".json"):
        raise UserError(f"{path}: unsupported file type {ext!r}; use .jsonl, .json, .parquet or a saved dataset directory")
    _check_text_file(path)
    kind = "json" if _is_json_document(path, ext) else "jsonl"
    st = os.stat(path)
    # The file's size and mtime are in the key of the cached table, so an edited file is read again, and so is
    # this code's digest (CODE_DIGEST). Strings: datasets would shard a list given in gen_kwargs.
    try:
        ds = datasets.Dataset.from_generator(
            _json_rows if kind == "json" else _jsonl_rows,
            gen_kwargs={"path": os.path.abspath(path), "stamp": f"{st.st_size}:{st.st_mtime_ns}", "code": CODE_DIGEST},
        )
    except datasets.exceptions.DatasetGenerationError as e:  # a whole-file problem of a JSON array, found reading it
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise
    return RawRecords(path, kind, ds)


def _load_saved(path: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad directory
        raise UserError(f"{path}: not a dataset saved with Dataset.save_to_disk ({type(e).__name__}: {e})")
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path}: a DatasetDict without a 'train' split; save a single Dataset instead")
        ds = ds["train"]
    return ds


def _nonempty(raw: RawRecords) -> RawRecords:
    if len(raw.dataset) == 0:
        raise UserError(f"{raw.path}: holds no records (0 rows); point train_file/eval_file at a file with records")
    return raw


def _check_text_file(path: str) -> None:
    """The whole-file problems of a JSON(L) file, each one line: empty, blank, not UTF-8 at all."""
    with open(path, "rb") as f:
        head = f.read(4)
        if not head:
            raise UserError(f"{path}: the file is empty (0 bytes), so there is nothing to train on; write records "
                            f"into it (one JSON object per line) or point train_file/eval_file at another file")
        if head.startswith(UTF16_32_BOMS):
            raise UserError(f"{path}: is UTF-16/UTF-32 text (it starts with that byte-order mark); save it as UTF-8")
        f.seek(0)
        lines = 0
        for line in f:  # stops at the first record: only a file of blank lines is read to its end
            if line.strip().lstrip(codecs.BOM_UTF8).strip():
                return
            lines += 1
    raise UserError(f"{path}: holds no records, only {lines} blank line(s); write records into it "
                    f"(one JSON object per line) or point train_file/eval_file at another file")


def _is_json_document(path: str, ext: str) -> bool:
    """Whether a file is one JSON document (an array of records, or a single record) rather than JSONL (one
    object per line). A ``.json`` file may hold either, as many dumps do; a ``.jsonl`` file is JSONL unless
    the whole of it parses as one array (an array saved under the wrong name)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        line = next((line for line in f if line.strip()), "")
    if line.lstrip().startswith("["):
        return ext == ".json" or isinstance(_parsed_or_none(path), list)
    if ext != ".json":
        return False
    try:
        json.loads(line)
        return False  # the first line is a whole record: JSONL
    except json.JSONDecodeError:
        pass
    return isinstance(_parsed_or_none(path), dict)  # a record pretty-printed over several lines


def _parsed_or_none(path: str):
    try:
        return _read_json_document(path)
    except UserError:
        return None


def _read_json_document(path: str):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); fix that line (a .json "
                        f"array is one document: one error stops it all; JSONL is checked record by record)")


def _json_rows(path: str, stamp: str, code: str):
    """Rows of a ``.json`` document: each element of its array (or the single record it holds)."""
    data = _read_json_document(path)
    if data == []:
        raise UserError(f"{path}: holds no records (an empty JSON array); write records into it")
    for i, record in enumerate(data if isinstance(data, list) else [data]):
        yield {WHERE: i, RAW: json.dumps(record, ensure_ascii=False), PROBLEM: ""}


def _jsonl_rows(path: str, stamp: str, code: str):
    """Rows of a JSONL file: one per non-blank line, with its true line number. A UTF-8 byte-order mark is
    dropped at the start of any line (files concatenated with ``cat`` carry one per part)."""
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that line's problem, not the file's
        for lineno, line in enumerate(f, start=1):
            line = line.lstrip(codecs.BOM_UTF8)
            if not line.strip():
                continue
            try:
                text, problem = line.decode("utf-8"), ""
            except UnicodeDecodeError as e:
                text = ""
                problem = f"not UTF-8 text (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line); save the file as UTF-8"
            yield {WHERE: lineno, RAW: text, PROBLEM: problem}


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


# --------------------------------------------------------------------------------------------
# every record checked, without a tokenizer
# --------------------------------------------------------------------------------------------


def _source_digest(*names: str) -> str:
    """A digest of the modules that turn records into examples. ``datasets`` keys its cache on the mapped
    function and its arguments, but refers to module-level functions by name: without this, a changed rule
    here would reuse an old cached result."""
    import hashlib

    h = hashlib.sha256()
    for name in names:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


CODE_DIGEST = _source_digest("records.py", "formats.py", "data.py")


@dataclass
class Checked:
    """The check of every record of a file: ``stats`` has one row per raw row (``problem`` and
    ``Conversation.stats()``), ``good`` the raw rows without a problem, ``problems`` (row, message) the others."""

    stats: Any
    good: list[int]
    problems: list[tuple[int, str]]


def check_records(raw: RawRecords, requested_format: str) -> Checked:
    """Parse and normalise every record (cached by ``datasets``; no tokenizer needed)."""
    import datasets

    features = datasets.Features({PROBLEM: datasets.Value("string"), "format": datasets.Value("string"),
                                  **{k: datasets.Value("int64") for k in EMPTY_STATS if k != "format"}})
    stats = raw.dataset.map(
        _check_row,
        fn_kwargs={"is_text": raw.is_text, "requested_format": requested_format, "code": CODE_DIGEST},
        remove_columns=raw.dataset.column_names,
        features=features,
        desc=f"checking {os.path.basename(raw.path)}",
    )
    good, problems = [], []
    for i, problem in enumerate(stats[PROBLEM]):
        if problem:
            problems.append((i, problem))
        else:
            good.append(i)
    return Checked(stats, good, problems)


def _check_row(row: dict, is_text: bool, requested_format: str, code: str) -> dict:
    try:
        conversation = to_conversation(parse_row(row, is_text), requested_format)
    except RecordProblem as e:
        return {PROBLEM: str(e), **EMPTY_STATS}
    return {PROBLEM: "", **conversation.stats()}
