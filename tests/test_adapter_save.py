"""The final adapter write when the disk is full: one line, exit code 2, no ``adapter.tmp-*`` left, no
half-written ``adapter/``, and an earlier run's adapter never in ``adapter/`` beside this run's metrics.

The disk is a real one that fills up (``tests/fullfs.py``: a small tmpfs where this process may mount one,
else a per-file size limit in the child), and the run is the real command line.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, base_config, write_jsonl, write_yaml
from fullfs import small_filesystem
from qwenloop.adapter import save_adapter
from qwenloop.errors import UserError
from test_cli_errors import assert_clean_error


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """A few short conversations: what the child writes besides the adapter stays far below the limits."""
    from qwenloop.tiny import demo_conversations

    return str(write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", demo_conversations(8, seed=3)))


def earlier_run(out: Path, adapter: bytes) -> None:
    """What a finished earlier run left in ``out`` (the new run replaces it: overwrite_output_dir)."""
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(adapter)
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 0.5}\n')


def train(tiny_model, data, out: Path, fs, tmp_path) -> subprocess.CompletedProcess:
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, data, out, max_steps=2, max_seq_len=64,
                                                      overwrite_output_dir=True))
    return subprocess.run([sys.executable, "-m", "qwenloop", "train", str(cfg)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, preexec_fn=fs.preexec, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def this_runs_steps(out: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


EARLIER_ADAPTER = b"the earlier run's adapter\n" * 4


def files_holding(root: Path, content: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.read_bytes() == content]


@pytest.mark.parametrize("previous", [False, True], ids=["fresh-output-dir", "over-an-earlier-run"])
def test_full_disk_at_the_final_adapter(tmp_path, tiny_model, small_data, previous):
    # 24 kB: room for this run's metrics and config.yaml, not for its adapter (~36 kB of safetensors alone).
    with small_filesystem(tmp_path, 24_000) as fs:
        out = fs.path / "out"
        if previous:
            earlier_run(out, EARLIER_ADAPTER)
        proc = train(tiny_model, small_data, out, fs, tmp_path)
        remedy = "free disk space" if fs.kind == "tmpfs" else "file-size limit (ulimit -f)"
        assert_clean_error(proc, f"adapter: could not write {out / 'adapter'}", "no adapter was written", remedy,
                           "run again")
        left = sorted(os.listdir(out))
        assert not [e for e in left if e.startswith("adapter")], left  # no adapter/, no adapter.tmp-*
        assert {"config.yaml", "metrics.jsonl"} <= set(left), left
        assert this_runs_steps(out) == [1, 2]
        if previous:  # intact where the run moved it aside (never in adapter/), or gone: never half of it
            kept = files_holding(out, EARLIER_ADAPTER)
            assert all("adapter" not in p.relative_to(out).parts[:1] for p in kept), kept


# --------------------------------------------------------------------------------------------------
# Every rank learns the outcome: no rank waits forever, none reports success alone
# --------------------------------------------------------------------------------------------------

class OneRankOfTwo:
    """The part of an Accelerator ``save_adapter`` uses; ``reduce`` answers what the other rank contributes."""

    device = torch.device("cpu")
    num_processes = 2

    def __init__(self, main: bool, other_failed: bool):
        self.is_main_process, self.other_failed, self.reduced = main, other_failed, []

    def unwrap_model(self, model):
        return model

    def reduce(self, tensor, reduction="sum"):
        self.reduced.append(tensor.item())
        return tensor + (1.0 if self.other_failed else 0.0)

    def wait_for_everyone(self):
        pass


GATHER = SimpleNamespace(adapter_state_dict=lambda model: {})


def test_other_ranks_stop_when_the_main_process_could_not_write(tmp_path):
    rank1 = OneRankOfTwo(main=False, other_failed=True)
    with pytest.raises(UserError, match="the main process could not write"):
        save_adapter(rank1, GATHER, object(), None, str(tmp_path / "adapter"))
    ok = OneRankOfTwo(main=False, other_failed=False)
    assert save_adapter(ok, GATHER, object(), None, str(tmp_path / "adapter")) is None


def test_a_bug_while_writing_still_reaches_the_agreement(tmp_path):
    """A non-OSError on the main process (here: no PEFT config) keeps its traceback, but only after telling the
    other ranks, and leaves no temporary directory."""
    rank0 = OneRankOfTwo(main=True, other_failed=False)
    with pytest.raises(AttributeError):
        save_adapter(rank0, GATHER, SimpleNamespace(active_adapter="default"), None, str(tmp_path / "adapter"))
    assert rank0.reduced == [1.0]
    assert os.listdir(tmp_path) == []
