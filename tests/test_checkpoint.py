"""Checkpoint files, unit level: atomic layout, completion marker, partial directories ignored and
removed, retention, weights_only loads, RNG round trip, a failing save (disk full) leaves the
previous checkpoint intact, bad resume_from / incompatible checkpoint / unwritable output_dir errors."""

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import base_config, load_adapter_tensors, reset_accelerate_state, run_cli, write_yaml
from qwenloop import TrainConfig, train
from qwenloop import checkpoint as ckpt, faults, storage
from qwenloop.errors import UserError


def fake_checkpoint(output_dir: Path, step: int, complete: bool = True, run_id: str = "run-a") -> Path:
    """A checkpoint directory with every file a real one has (placeholder contents) and, when complete, its
    manifest: it verifies like a real one."""
    path = Path(output_dir) / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step)
    for rel in ("adapter/adapter_model.safetensors", "optimizer/optimizer.pt", "rng/rank-00000.pt", "scheduler.pt"):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(f"{rel} of step {step}".encode())
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "run_id": run_id, "identity": {"world_size": 1}}))
    if complete:
        ckpt.write_manifest(str(path), step, run_id)
    return path


# ---- finding, retention, cleanup (no training) -------------------------------------------------


def test_partial_directories_are_never_picked_and_are_removed(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    renamed_no_marker = fake_checkpoint(tmp_path, 4, complete=False)  # killed between rename and marker
    tmp_dir = tmp_path / ckpt.CHECKPOINTS / (ckpt.TMP_PREFIX + ckpt.checkpoint_name(6))  # killed while writing
    tmp_dir.mkdir()
    assert ckpt.list_checkpoints(tmp_path) == [(2, str(good))]
    assert ckpt.find_latest(tmp_path) == str(good)
    removed = ckpt.remove_partial(tmp_path)
    assert sorted(removed) == sorted([str(renamed_no_marker), str(tmp_dir)])
    assert sorted(os.listdir(tmp_path / ckpt.CHECKPOINTS)) == [good.name]


def test_retention_counts_complete_checkpoints_only(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    partial = fake_checkpoint(tmp_path, 5, complete=False)
    deleted = ckpt.prune(tmp_path, keep=2)
    assert [Path(p).name for p in deleted] == ["step-0000001", "step-0000002"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert partial.exists()  # an incomplete newer one does not push out a complete one
    assert ckpt.prune(tmp_path, keep=0) == []  # 0 keeps all


def test_resolve_resume(tmp_path):
    cfg = TrainConfig.from_dict({"model": "m", "train_file": "t", "output_dir": str(tmp_path), "resume_from": "auto"})
    assert ckpt.resolve_resume(cfg) is None  # auto with nothing to resume: start from scratch
    good = fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 5, complete=False)
    assert ckpt.resolve_resume(cfg) == str(good)
    for given, want in [(str(good), str(good)), (str(tmp_path), str(good)), (str(tmp_path / ckpt.CHECKPOINTS), str(good))]:
        cfg.resume_from = given
        assert ckpt.resolve_resume(cfg) == want
    cfg.resume_from = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="resume_from: .*nowhere does not exist"):
        ckpt.resolve_resume(cfg)
    cfg.resume_from = str(tmp_path / ckpt.CHECKPOINTS / "step-0000005")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.resolve_resume(cfg)


def test_rng_state_round_trip_with_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(2)
    storage.save_torch(ckpt.rng_state(), str(tmp_path / "rng.pt"))
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_fault_spec_steps(monkeypatch):
    assert faults.step_matches("3", 3) and not faults.step_matches("3", 4)
    assert faults.step_matches("5-", 9) and not faults.step_matches("5-", 4)
    assert faults.step_matches("2-4", 4) and not faults.step_matches("2-4", 5)
    monkeypatch.setenv("QWENLOOP_FAULT", "nan_loss:1:3,sigterm:0:2-")
    assert faults.fault_ranks("nan_loss", 3) == [1] and faults.fault_ranks("nan_loss", 4) == []
    assert faults.fault_ranks("sigterm", 7) == [0]
    loss = torch.tensor(2.0)
    assert torch.isnan(faults.poison_loss(loss, 1, 3)) and faults.poison_loss(loss, 0, 3) == 2.0


# ---- one real single-process run with checkpoints ------------------------------------------------


def stopped_copy(src: Path, out: Path) -> Path:
    """A copy of a finished run as it was when stopped after its last checkpoint (no final adapter, no run.json):
    what ``resume_from: auto`` continues (a finished run it refuses)."""
    shutil.copytree(src, out)
    shutil.rmtree(out / "adapter")
    (out / "run.json").unlink()
    return out


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, tiny_model, train_jsonl):
    reset_accelerate_state()
    out = tmp_path_factory.mktemp("ckpt") / "run"
    result = train(TrainConfig.from_dict(base_config(tiny_model, train_jsonl, out, max_steps=4, checkpoint_every_steps=1,
                                                      keep_last_checkpoints=2)))
    reset_accelerate_state()
    return out, result


def test_checkpoint_layout_and_retention(checkpointed_run):
    out, result = checkpointed_run
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 4]  # 1 and 2 pruned once 3 and 4 were complete
    assert sorted(os.listdir(out / ckpt.CHECKPOINTS)) == ["step-0000003", "step-0000004"]  # no temporary left
    path = out / ckpt.CHECKPOINTS / "step-0000004"
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == ["COMPLETE", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml",
                     "optimizer/optimizer.pt", "rng/rank-00000.pt", "scheduler.pt", "trainer_state.json"]
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    assert state["step"] == 4 and state["epoch"] == 0 and state["batches_in_epoch"] == 4 and state["sampler_seed"] == 7
    assert state["identity"]["world_size"] == 1 and state["identity"]["micro_batch_size"] == 4
    assert result.last_checkpoint == str(path)


def test_checkpoint_holds_the_adapter_only_and_loads_with_weights_only(checkpointed_run):
    import yaml

    from qwenloop.adapter import verify_adapter
    from qwenloop.model import expected_adapter_shapes

    out, result = checkpointed_run
    path = out / ckpt.CHECKPOINTS / "step-0000004"
    expected = expected_adapter_shapes(result.model)
    verify_adapter(str(path / "adapter"), expected)
    adapter = load_adapter_tensors(path / "adapter")
    assert set(adapter) == set(expected)  # LoRA tensors only: no frozen base weight
    # The final adapter equals the last checkpoint's (bitwise).
    final = load_adapter_tensors(out / "adapter")
    assert all(torch.equal(adapter[k], final[k]) for k in final)
    for pt in path.rglob("*.pt"):
        torch.load(pt, weights_only=True)  # raises on anything but tensors and plain containers
    optimizer = torch.load(path / "optimizer" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(expected)  # Adam moments of the adapter only
    assert yaml.safe_load((path / "config.yaml").read_text())["max_steps"] == 4
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 3 * adapter_bytes + 64 * 1024, size  # adapter + 2 Adam moments + small files


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, tiny_model, train_jsonl, monkeypatch, reset_accelerate):
    monkeypatch.setenv("QWENLOOP_FAULT", "disk_full:4")
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train(TrainConfig.from_dict(base_config(tiny_model, train_jsonl, out, max_steps=6, checkpoint_every_steps=2)))
    message = str(e.value)
    assert "checkpoint: could not write" in message and "No space left on device" in message, message
    assert "step-0000002 is intact" in message and "resume_from: auto" in message, message
    assert sorted(os.listdir(out / ckpt.CHECKPOINTS)) == ["step-0000002"]  # temporary directory removed
    assert ckpt.find_latest(out).endswith("step-0000002")
    torch.load(out / ckpt.CHECKPOINTS / "step-0000002" / "optimizer" / "optimizer.pt", weights_only=True)


def test_incompatible_checkpoint_is_refused_unless_forced(checkpointed_run, tmp_path, tiny_model, train_jsonl, reset_accelerate):
    src, _ = checkpointed_run
    out = stopped_copy(src, tmp_path / "run")
    changed = base_config(tiny_model, train_jsonl, out, max_steps=6, micro_batch_size=2, resume_from="auto")
    with pytest.raises(UserError, match=r"resume_from: .*step-0000004 was written with other settings "
                                        r"\(micro_batch_size 4 -> 2, max_steps 4 -> 6\).*force_resume: true"):
        train(TrainConfig.from_dict(changed))
    reset_accelerate_state()
    result = train(TrainConfig.from_dict({**changed, "force_resume": True}))
    assert result.steps == 6 and result.resumed_from.endswith("step-0000004")
    assert len(result.losses) == 2


PREVIOUS_FORMAT_IDENTITY = ("world_size", "micro_batch_size", "gradient_accumulation_steps", "seed", "train_examples",
                            "train_target_tokens")


def as_previous_format(path: Path) -> None:
    """Rewrite a checkpoint as the format before manifests wrote it: COMPLETE without a file list, no run id, an
    identity of the data-position keys only (before `packing` / `group_by_length` existed, too)."""
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    state["identity"] = {k: state["identity"][k] for k in PREVIOUS_FORMAT_IDENTITY}
    del state["run_id"]
    state["format"] = 1
    (path / ckpt.STATE_FILE).write_text(json.dumps(state))
    (path / ckpt.MARKER).write_text(json.dumps({"step": state["step"], "time": 0.0}))


def test_checkpoint_of_the_previous_format_still_resumes(checkpointed_run, tmp_path, tiny_model, train_jsonl, reset_accelerate,
                                                         caplog):
    """A checkpoint without manifest, run id or the newer identity keys resumes exactly, with a warning; the settings
    its identity lacks are compared with its config.yaml (`packing` too, which it predates: off), so a change is
    still refused."""
    src, _ = checkpointed_run
    out = stopped_copy(src, tmp_path / "run")
    step3 = out / ckpt.CHECKPOINTS / "step-0000003"
    as_previous_format(step3)
    cfg = base_config(tiny_model, train_jsonl, out, max_steps=4, resume_from=str(step3))
    with pytest.raises(UserError, match=r"was written with other settings \(packing False -> True\)"):
        train(TrainConfig.from_dict({**cfg, "packing": True}))
    reset_accelerate_state()
    with pytest.raises(UserError, match=r"other settings \(learning_rate 0.001 -> 0.002\)"):
        train(TrainConfig.from_dict({**cfg, "learning_rate": 2e-3}))  # read from its config.yaml
    reset_accelerate_state()
    with caplog.at_level(logging.WARNING, logger="qwenloop"):
        result = train(TrainConfig.from_dict(cfg))
    assert result.steps == 4 and result.resumed_from == str(step3)
    assert "before checkpoints carried checksums" in caplog.text and "train_file_sha256" in caplog.text
    final, straight = load_adapter_tensors(out / "adapter"), load_adapter_tensors(src / "adapter")
    assert all(torch.equal(final[k], straight[k]) for k in straight)  # still an exact continuation


def test_resume_from_nowhere_is_a_clean_cli_error(tmp_path, tiny_model, train_jsonl):
    from test_cli_errors import assert_clean_error

    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, tmp_path / "out"))
    assert_clean_error(run_cli("train", cfg, "--resume_from", str(tmp_path / "nope")), "resume_from:", "nope does not exist")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_unwritable_output_dir(tmp_path, tiny_model, train_jsonl, reset_accelerate):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match=r"output_dir: .*a-file/out is not writable"):
        train(TrainConfig.from_dict(base_config(tiny_model, train_jsonl, blocker / "out")))


def test_previous_run_may_be_resumed_in_place(checkpointed_run, tmp_path, tiny_model, train_jsonl, reset_accelerate):
    """The output_dir refusal lets a resume continue the run that is there; metrics are cut back to the checkpoint."""
    src, _ = checkpointed_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    cfg = base_config(tiny_model, train_jsonl, out, max_steps=4, checkpoint_every_steps=1, keep_last_checkpoints=2,
                      resume_from=str(out / ckpt.CHECKPOINTS / "step-0000003"))
    result = train(TrainConfig.from_dict(cfg))
    assert result.steps == 4 and len(result.losses) == 1
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3, 4]  # step 4 rewritten in place
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
