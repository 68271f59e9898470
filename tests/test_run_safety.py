"""Never mix up, overwrite or lose a run (issue 10), end to end on CPU.

- Replacing a run (``overwrite_output_dir``) moves every file of it aside, checkpoints included; checkpoints carry
  the id of the run that wrote them, and retention and ``resume_from: auto`` never take another run's.
- ``resume_from: auto`` refuses to replace a finished run; over an attempt that left no checkpoint it starts
  fresh and keeps that attempt's files.
- A resume with a setting that defines the run changed (learning rate, LoRA alpha, the data's content or order)
  is refused naming each key, old -> new; forced, the new values apply and the log says so.
- A real full filesystem (tmpfs, ``tests/fullfs.py``) during a checkpoint save (torch.save and safetensors
  failing) and during a ``metrics.jsonl`` append: one line, exit code 2, the previous checkpoint intact,
  nothing left behind, and the run resumes once there is room.
- A damaged newest checkpoint (truncated, missing, edited files) is found by its manifest; ``auto`` falls back
  to the newest one that verifies, an explicit path is a one-line error.
- A torn last line in ``metrics.jsonl`` is dropped on resume.
- A second SIGTERM during the save the first one started does not interrupt it.
"""

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import base_config, load_adapter_tensors, read_metrics, train_in_process, write_yaml
from fullfs import small_filesystem
from test_checkpoint import fake_checkpoint
from test_cli_errors import assert_clean_error
from test_resume import cli_rc
from qwenloop import checkpoint as ckpt
from qwenloop.errors import RunStopped, UserError


def stopped_in_process(cfg: dict, step: int):
    """Train ``cfg`` in this process until SIGTERM (the real handler) stops it after ``step``."""
    os.environ["QWENLOOP_FAULT"] = f"sigterm:0:{step}"
    try:
        with pytest.raises(RunStopped) as stop:
            train_in_process(cfg)
    finally:
        del os.environ["QWENLOOP_FAULT"]
    return stop.value


def adapters_equal(dir_a, dir_b) -> bool:
    a, b = load_adapter_tensors(dir_a), load_adapter_tensors(dir_b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, train_jsonl):
    """The same 6-step run straight, and stopped by SIGTERM after step 4 (checkpoints 2 and 4, no adapter)."""
    root = tmp_path_factory.mktemp("safety")
    cfg = base_config(tiny_model, train_jsonl, root / "straight", max_steps=6, checkpoint_every_steps=2)
    train_in_process(cfg)
    stopped_in_process({**cfg, "output_dir": str(root / "stopped")}, 4)
    assert [s for s, _ in ckpt.list_checkpoints(root / "stopped")] == [2, 4]
    return {"root": root, "cfg": cfg, "straight": root / "straight", "stopped": root / "stopped"}


def resume_cfg(runs, out: Path, **changes) -> dict:
    return {**runs["cfg"], "output_dir": str(out), "resume_from": "auto", **changes}


# ---- 1. overwriting a run ---------------------------------------------------------------------------


def test_overwriting_a_run_moves_all_of_it_aside_and_auto_resumes_the_new_run(tmp_path, tiny_model, train_jsonl):
    """Run A checkpoints steps 7 and 8; run B replaces it (overwrite_output_dir), checkpoints step 3 and is
    stopped; `auto` resumes B from its own step 3 (not A's step 8), and B ends as if never stopped."""
    out = tmp_path / "run"
    train_in_process(base_config(tiny_model, train_jsonl, out, max_steps=8, checkpoint_every_steps=1))
    run_a = ckpt.current_run_id(out)
    a_adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    run_b = base_config(tiny_model, train_jsonl, out, max_steps=6, checkpoint_every_steps=3, overwrite_output_dir=True,
                        learning_rate=2e-3)
    stopped_in_process(run_b, 3)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [3]  # B's checkpoint kept; none of A's left in the directory
    assert ckpt.checkpoint_run_id(ckpt.find_latest(out)) == ckpt.current_run_id(out) != run_a
    assert not (out / "adapter").exists()
    [moved] = (out / ckpt.REPLACED).iterdir()  # everything of A, nothing deleted
    assert sorted(p.name for p in (moved / ckpt.CHECKPOINTS).iterdir()) == ["step-0000007", "step-0000008"]
    assert (moved / "adapter" / "adapter_model.safetensors").read_bytes() == a_adapter
    assert json.loads((moved / ckpt.RUN_ID_FILE).read_text())["run_id"] == run_a

    resumed = train_in_process({**run_b, "resume_from": "auto"})  # the same command, resumed
    assert resumed.resumed_from.endswith("step-0000003") and resumed.steps == 6
    straight = train_in_process({**run_b, "output_dir": str(tmp_path / "straight")})
    assert adapters_equal(out / "adapter", straight.adapter_dir)
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 7))


def test_retention_and_auto_never_take_another_runs_checkpoints(tmp_path):
    for step in (7, 8):
        fake_checkpoint(tmp_path, step, run_id="run-a")
    mine = fake_checkpoint(tmp_path, 3, run_id="run-b")
    ckpt.write_run_id(str(tmp_path), "run-b")
    assert ckpt.prune(str(tmp_path), keep=1, run_id="run-b") == []  # A's newer steps do not push out B's
    path, skipped = ckpt.newest_resumable(str(tmp_path), "run-b")
    assert path == str(mine)
    assert [Path(p).name for p, _ in skipped] == ["step-0000008", "step-0000007"]
    assert all("written by another run (run-a" in why for _, why in skipped)


# ---- 2. auto never replaces a finished run -----------------------------------------------------------


def test_auto_refuses_to_replace_a_finished_run(tmp_path, tiny_model, train_jsonl):
    out = tmp_path / "run"
    cfg = base_config(tiny_model, train_jsonl, out, max_steps=2)  # no checkpoints
    train_in_process(cfg)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    yaml_file = write_yaml(tmp_path / "c.yaml", cfg)
    assert_clean_error(cli_rc(yaml_file, "--resume_from", "auto"), "output_dir:", "that finished",
                       "resume_from: auto has nothing to continue", "overwrite_output_dir: true")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    from qwenloop import TrainConfig
    from qwenloop.checks import make_context, run_checks

    findings = run_checks(make_context(TrainConfig.from_dict({**cfg, "resume_from": "auto"}), None))
    assert [f.check for f in findings if f.level == "error"] == ["previous_run"]  # the doctor says it too

    train_in_process({**cfg, "resume_from": "auto", "overwrite_output_dir": True})  # asked: replaced, kept aside
    [moved] = (out / ckpt.REPLACED).iterdir()
    assert (moved / "adapter" / "adapter_model.safetensors").read_bytes() == before[out / "adapter" / "adapter_model.safetensors"]
    assert (moved / "metrics.jsonl").read_bytes() == before[out / "metrics.jsonl"]


def test_auto_starts_over_an_attempt_that_left_no_checkpoint_and_keeps_its_files(tmp_path, tiny_model, train_jsonl):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # killed before its first checkpoint
    result = train_in_process(base_config(tiny_model, train_jsonl, out, max_steps=2, resume_from="auto"))
    assert result.resumed_from is None and result.steps == 2
    [moved] = (out / ckpt.REPLACED).iterdir()
    assert (moved / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'


# ---- 3. settings changed on resume ----------------------------------------------------------------------


def test_changed_settings_are_refused_naming_each(runs, tmp_path):
    out = copy_run(runs["stopped"], tmp_path / "run")
    with pytest.raises(UserError) as e:
        train_in_process(resume_cfg(runs, out, learning_rate=2e-3, lora={**runs["cfg"]["lora"], "alpha": 16}))
    message = str(e.value)
    assert "step-0000004 was written with other settings (lora.alpha 8 -> 16, learning_rate 0.001 -> 0.002)" in message
    assert "force_resume: true" in message
    assert not (out / "adapter").exists()


def test_reordered_training_data_is_other_data(runs, tmp_path, train_jsonl):
    """Same examples, same counts, another order: the content is compared, not only the counts. The same
    content at another path is the same data (the path is taken from the new config, and said)."""
    lines = Path(train_jsonl).read_text().splitlines(keepends=True)
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("".join(reversed(lines)))
    out = copy_run(runs["stopped"], tmp_path / "run")
    with pytest.raises(UserError, match=r"other settings \(train_file_sha256 [0-9a-f]{12}… -> [0-9a-f]{12}…\)"):
        train_in_process(resume_cfg(runs, out, train_file=str(reordered)))
    moved = tmp_path / "moved.jsonl"
    shutil.copy(train_jsonl, moved)
    result = train_in_process(resume_cfg(runs, out, train_file=str(moved)))
    assert result.resumed_from.endswith("step-0000004")
    assert adapters_equal(out / "adapter", runs["straight"] / "adapter")


def test_forced_new_learning_rate_applies_and_the_log_says_what_comes_from_where(runs, tmp_path, caplog):
    out = copy_run(runs["stopped"], tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="qwenloop"):
        train_in_process(resume_cfg(runs, out, learning_rate=2e-3, force_resume=True))
    assert "force_resume: the new config's values apply from step 4" in caplog.text
    assert "learning_rate 0.001 -> 0.002" in caplog.text
    straight = {m["step"]: m["lr"] for m in read_metrics(runs["straight"]) if "loss" in m}
    resumed = {m["step"]: m["lr"] for m in read_metrics(out) if "loss" in m}
    assert resumed[4] == straight[4]  # before the resume: the old run's lines
    assert resumed[5] == pytest.approx(2 * straight[5]) and resumed[6] == pytest.approx(2 * straight[6])


def test_unchanged_resume_says_what_it_takes_from_where_and_is_exact(runs, tmp_path, caplog):
    out = copy_run(runs["stopped"], tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="qwenloop"):
        train_in_process(resume_cfg(runs, out, checkpoint_every_steps=3, log_every_steps=1))
    assert "resume: from the checkpoint: the adapter weights, optimizer state" in caplog.text
    assert "equals the checkpoint's" in caplog.text
    assert "resume: from the new config" in caplog.text and "checkpoint_every_steps 2 -> 3" in caplog.text
    assert adapters_equal(out / "adapter", runs["straight"] / "adapter")


# ---- 4. a real full disk ---------------------------------------------------------------------------------


def pages(nbytes: int, page: int) -> int:
    return -(-nbytes // page) * page


def checkpoint_files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fails_in", ["optimizer/optimizer.pt", "adapter/adapter_model.safetensors"])
def test_full_disk_during_a_checkpoint_save(fails_in, tmp_path, tiny_model, train_jsonl):
    """The disk fills while the checkpoint of step 4 is written, in torch.save (optimizer) or in safetensors
    (adapter): one line, exit code 2, step 2 intact, no temporary directory; with room again, the run resumes."""
    with small_filesystem(tmp_path, 4 * 1024 * 1024) as fs:
        if fs.kind != "tmpfs" and fails_in.startswith("adapter"):
            pytest.skip("needs a real small filesystem (tmpfs): a per-file size limit fails the bigger optimizer file first")
        out = fs.path / "run"
        cfg = base_config(tiny_model, train_jsonl, out, max_steps=6, checkpoint_every_steps=2)
        stopped_in_process(cfg, 2)
        step2 = out / ckpt.CHECKPOINTS / "step-0000002"
        sizes = checkpoint_files(step2)
        page = os.statvfs(fs.path).f_bsize
        if fails_in.startswith("optimizer"):
            room = page  # the start files' rewrites need one page at a time; the optimizer file is many
        else:
            room = pages(sizes["optimizer/optimizer.pt"], page) + pages(sizes["rng/rank-00000.pt"], page)
        fs.leave_free(room)
        resume = write_yaml(tmp_path / "b.yaml", {**cfg, "resume_from": "auto"})
        if fs.kind == "rlimit":  # every file the child writes is capped below the optimizer file
            fs.size = sizes["optimizer/optimizer.pt"] - 1
        proc = cli_rc(resume, preexec_fn=fs.preexec)
        line = assert_clean_error(proc, "checkpoint: could not write", ".tmp-step-0000004", "step-0000002 is intact",
                                  "resume_from: auto")
        assert fails_in in line and ("No space left on device" in line or "File too large" in line), line
        assert sorted(os.listdir(out / ckpt.CHECKPOINTS)) == ["step-0000002"]  # nothing left behind
        assert ckpt.verify_checkpoint(str(step2)).problem is None
        assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]  # every line whole

        fs.release()
        finished = train_in_process({**cfg, "resume_from": "auto"})
        assert finished.resumed_from == str(step2)
        assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 7))


def test_full_disk_during_a_metrics_append(tmp_path, tiny_model, train_jsonl):
    """metrics.jsonl cannot grow: one line naming it, exit code 2, the checkpoint intact, no torn line."""
    with small_filesystem(tmp_path, 4 * 1024 * 1024) as fs:
        out = fs.path / "run"
        cfg = base_config(tiny_model, train_jsonl, out, max_steps=40)
        stopped_in_process(cfg, 2)
        fs.leave_free(os.statvfs(fs.path).f_bsize)  # one page: metrics.jsonl's next one, then nothing
        if fs.kind == "rlimit":
            fs.size = 6000  # metrics.jsonl may not grow past ~15 lines
        proc = cli_rc(write_yaml(tmp_path / "b.yaml", {**cfg, "resume_from": "auto"}), preexec_fn=fs.preexec)
        line = assert_clean_error(proc, "metrics: could not append step", "metrics.jsonl",
                                  "the newest checkpoint", "step-0000002 is intact", "resume_from: auto")
        assert "No space left on device" in line or "File too large" in line, line
        raw = (out / "metrics.jsonl").read_bytes()
        assert raw.endswith(b"\n") and all(json.loads(l) for l in raw.splitlines())  # no torn line
        steps = [json.loads(l)["step"] for l in raw.splitlines()]
        assert steps == list(range(1, len(steps) + 1)) and 2 < len(steps) < 40
        assert sorted(os.listdir(out)) == ["checkpoints", "config.yaml", "metrics.jsonl", "run_id.json"]
        assert ckpt.verify_checkpoint(str(out / ckpt.CHECKPOINTS / "step-0000002")).problem is None


# ---- 5. damaged checkpoints -----------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_same_size(path: Path) -> None:
    text = path.read_text()
    path.write_text(text.replace('"tokens_seen": ', '"tokens_seen": 1', 1).replace(" ", "", 1))  # same length


DAMAGE = {
    "truncated optimizer": (lambda p: truncate(p / "optimizer" / "optimizer.pt"), "optimizer/optimizer.pt has"),
    "missing scheduler": (lambda p: (p / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "edited state": (lambda p: edit_same_size(p / ckpt.STATE_FILE), "trainer_state.json does not match its SHA-256"),
    "truncated adapter": (lambda p: truncate(p / "adapter" / "adapter_model.safetensors"),
                          "adapter/adapter_model.safetensors has"),
    "missing RNG state": (lambda p: (p / "rng" / "rank-00000.pt").unlink(), "rng/rank-00000.pt is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_fails_verification(damage, runs, tmp_path):
    path = copy_run(runs["stopped"] / ckpt.CHECKPOINTS / "step-0000004", tmp_path / "step-0000004")
    assert ckpt.verify_checkpoint(str(path)).problem is None
    harm, expected = DAMAGE[damage]
    harm(path)
    problem = ckpt.verify_checkpoint(str(path)).problem
    assert problem and expected in problem, problem


def test_missing_rng_state_fails_a_checkpoint_without_manifest_too(runs, tmp_path):
    path = copy_run(runs["stopped"] / ckpt.CHECKPOINTS / "step-0000004", tmp_path / "step-0000004")
    (path / ckpt.MARKER).write_text(json.dumps({"step": 4, "time": 0.0}))  # the previous format: no file list
    assert ckpt.verify_checkpoint(str(path)) == ckpt.Verdict(None, legacy=True)
    (path / "rng" / "rank-00000.pt").unlink()
    assert ckpt.verify_checkpoint(str(path)).problem == "rng/rank-00000.pt is missing"


def test_auto_falls_back_to_the_newest_checkpoint_that_verifies(runs, tmp_path, caplog):
    out = copy_run(runs["stopped"], tmp_path / "run")
    truncate(out / ckpt.CHECKPOINTS / "step-0000004" / "optimizer" / "optimizer.pt")
    with caplog.at_level(logging.WARNING, logger="qwenloop"):
        result = train_in_process(resume_cfg(runs, out))
    assert result.resumed_from.endswith("step-0000002")
    assert "skipped" in caplog.text and "step-0000004: optimizer/optimizer.pt has" in caplog.text
    assert adapters_equal(out / "adapter", runs["straight"] / "adapter")  # still exact, from step 2


def test_auto_with_no_checkpoint_that_verifies_is_an_error_naming_each(runs, tmp_path):
    out = copy_run(runs["stopped"], tmp_path / "run")
    for step in ("step-0000002", "step-0000004"):
        (out / ckpt.CHECKPOINTS / step / "scheduler.pt").unlink()
    with pytest.raises(UserError, match=r"auto found no checkpoint .* \(step-0000004: scheduler.pt is missing; "
                                        r"step-0000002: scheduler.pt is missing\).*overwrite_output_dir: true"):
        train_in_process(resume_cfg(runs, out))


def test_explicit_damaged_checkpoint_is_a_one_line_error(runs, tmp_path):
    out = copy_run(runs["stopped"], tmp_path / "run")
    damaged = out / ckpt.CHECKPOINTS / "step-0000004"
    (damaged / "scheduler.pt").unlink()
    cfg = write_yaml(tmp_path / "c.yaml", {**runs["cfg"], "output_dir": str(out), "resume_from": str(damaged)})
    assert_clean_error(cli_rc(cfg), f"resume_from: {damaged} cannot be resumed from: scheduler.pt is missing",
                       "step-0000002")


# ---- 6. a torn metrics line ---------------------------------------------------------------------------


def test_torn_last_metrics_line_is_dropped_on_resume(runs, tmp_path, caplog):
    out = copy_run(runs["stopped"], tmp_path / "run")
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "epoch": 0, "loss": 7.1, "note": "\xe2\x82')  # killed mid-write, mid-character
    with caplog.at_level(logging.WARNING, logger="qwenloop"):
        train_in_process(resume_cfg(runs, out))
    assert "dropped its last line" in caplog.text
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 7))
    assert adapters_equal(out / "adapter", runs["straight"] / "adapter")


# ---- 8. a second SIGTERM while the first one's checkpoint is written ------------------------------------


def test_second_sigterm_during_the_save_does_not_interrupt_it(tmp_path, tiny_model, train_jsonl):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, train_jsonl, out, max_steps=6))
    proc = cli_rc(cfg, fault="sigterm:0:4,sigterm_during_checkpoint:4")
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr[-3000:])
    assert "SIGTERM received while already stopping: the checkpoint is written first" in proc.stderr
    assert "stopped: SIGTERM received: checkpoint of step 4 written" in proc.stderr
    assert sorted(os.listdir(out / ckpt.CHECKPOINTS)) == ["step-0000004"]  # complete, no .tmp-* left
    assert ckpt.verify_checkpoint(str(out / ckpt.CHECKPOINTS / "step-0000004")).problem is None
