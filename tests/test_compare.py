"""`qwenloop compare` (qwenloop/compare.py) on real runs of the tiny model: the table's numbers against the ones
recomputed from the runs' files, the figure's axes and data, the refusal of runs of different jobs (naming the
keys), what may differ between runs of one job (the batch split, where a run was written), and bad input (one line,
exit code 2, nothing written). The same comparison over real DDP and ZeRO-3 runs is in test_distributed.py."""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import base_config, load_adapter_tensors, read_metrics, train_in_process

from qwenloop import cli
from qwenloop.compare import compare_runs, comparison_figure
from qwenloop.errors import UserError
from qwenloop.runlog import load_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, train_jsonl) -> dict[str, Path]:
    """a and b: one job, run twice; split: the same job with its batch of 4 as 2 x 2 accumulation; lr: another
    learning rate. Evaluated at step 2 and at the end. ~2 s each."""
    root = tmp_path_factory.mktemp("compare")
    variants = {"a": {}, "b": {}, "split": {"micro_batch_size": 2, "gradient_accumulation_steps": 2},
                "lr": {"learning_rate": 3e-3}}
    for name, overrides in variants.items():
        train_in_process(base_config(tiny_model, train_jsonl, root / name, eval_file=train_jsonl, eval_every_steps=2,
                                     **overrides))
    return {name: root / name for name in variants}


def edited_copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    path = dst / "config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **config}))
    return dst


def relative_l2(dir_a: Path, dir_ref: Path) -> float:
    a, ref = load_adapter_tensors(dir_a / "adapter"), load_adapter_tensors(dir_ref / "adapter")
    diff = sum(float(((a[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    return math.sqrt(diff / sum(float((t.double() ** 2).sum()) for t in ref.values()))


def test_table_numbers_are_the_runs_numbers(runs, tmp_path):
    """Forced over two jobs (another learning rate) so that every difference is far from zero."""
    ref, other = runs["a"], runs["lr"]
    result = compare_runs([ref, other], force=True, out=tmp_path)
    assert list(result.differences) == ["learning_rate"]
    for row, directory in zip(result.rows, (ref, other)):
        info = json.loads((directory / "run.json").read_text())
        metrics = read_metrics(directory)
        evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        assert (row.backend, row.precision, row.world_size) == (info["backend"], "fp32", info["world_size"])
        assert row.tokens_per_s == info["tokens_per_s"] and row.target_tokens_per_s == info["target_tokens_per_s"]
        assert row.memory_gib_per_rank == [r["rss_gib"] for r in info["peak_memory_per_rank"]]
        assert (row.seconds, row.seconds_kind) == (info["wall_seconds"], "wall")  # train() records the wall time
        assert (row.final_eval_loss, row.best_eval_loss) == (evals[-1], min(evals))
        assert f"| {info['tokens_per_s']:,.0f} | {info['target_tokens_per_s']:,.0f} |" in result.markdown
        assert f"| {evals[-1]:.4f} | {min(evals):.4f} |" in result.markdown
    ref_losses = {m["step"]: m["loss"] for m in read_metrics(ref) if "loss" in m}
    losses = {m["step"]: m["loss"] for m in read_metrics(other) if "loss" in m}
    expected = max(abs(losses[s] - ref_losses[s]) for s in ref_losses)
    row = result.rows[1]
    assert row.max_loss_diff == pytest.approx(expected, rel=1e-12) and row.steps_compared == 4 and expected > 1e-3
    assert row.adapter_distance == pytest.approx(relative_l2(other, ref), rel=1e-9)
    assert row.adapters_agree is False and row.adapter_distance > 1e-2
    assert f"{expected:.2e} (4 steps)" in result.markdown and f"{row.adapter_distance:.2e} (differ, tol 1e-03)" in result.markdown
    assert "- `learning_rate`: 0.001 (`a`), 0.003 (`lr`)" in result.markdown
    assert result.rows[0].is_reference and "| (reference) | (reference) |" in result.markdown


def test_the_same_job_agrees(runs):
    result = compare_runs([runs["a"], runs["b"], runs["split"]])
    assert not result.differences
    for row in result.rows[1:]:
        assert row.steps_compared == 4 and row.max_loss_diff <= 1e-5 * 8  # losses ~8: fp32 summation order
        assert row.adapters_agree and row.adapter_distance <= 1e-5
    assert [r.batch for r in result.rows] == [(4, 1, 1), (4, 1, 1), (2, 2, 1)]
    assert "| 2x2x1 |" in result.markdown


def test_the_figure_overlays_the_curves_and_their_difference(runs):
    loaded = [load_run(runs[name]) for name in ("a", "lr")]
    fig = comparison_figure(loaded, ["a", "lr"])
    curves, diffs = fig.get_axes()
    assert curves.get_title() == "train loss (dots: eval loss)" and diffs.get_title() == "train loss minus a's"
    labels = [ln.get_label() for ln in curves.get_lines()]
    assert labels == ["a (single, fp32, 1 rank)", "a eval", "lr (single, fp32, 1 rank)", "lr eval"]
    (diff,) = [ln for ln in diffs.get_lines() if ln.get_label() == "lr"]
    ref, other = (loaded[0].losses_by_step(), loaded[1].losses_by_step())
    assert list(diff.get_xdata()) == [1, 2, 3, 4]
    assert list(diff.get_ydata()) == [other[s] - ref[s] for s in (1, 2, 3, 4)]


def test_the_command_prints_and_writes_the_table_and_a_png(runs, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "report"
    assert cli.main(["compare", str(runs["a"]), str(runs["b"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# qwenloop compare: 2 runs, reference `a`")
    assert (out / "compare.md").read_text() == printed + "\n![loss curves](compare.png)\n"
    with Image.open(out / "compare.png") as img:
        assert img.format == "PNG" and img.size == (1200, 420)
        img.verify()


def test_runs_of_different_jobs_are_refused_naming_the_keys(runs, tmp_path, capsys):
    with pytest.raises(UserError) as e:
        compare_runs([runs["a"], runs["lr"]])
    assert "learning_rate: 0.001 in a, 0.003 in lr" in str(e.value) and "--force" in str(e.value)
    # Another global batch is another job, however it is split; the keys that only say where a run went are not.
    half = edited_copy(runs["a"], tmp_path / "half", micro_batch_size=2)
    moved = edited_copy(runs["b"], tmp_path / "moved", output_dir="/elsewhere", overwrite_output_dir=True, log_every_steps=2)
    with pytest.raises(UserError, match=r"global batch \(micro_batch_size x gradient_accumulation_steps x processes\): "
                                        r"'4x1x1=4' in a, '2x1x1=2' in half"):
        compare_runs([runs["a"], half])
    assert not compare_runs([runs["a"], moved]).differences
    lora = edited_copy(runs["a"], tmp_path / "lora", lora={"r": 8, "alpha": 8, "dropout": 0.0})
    out = tmp_path / "out"
    assert cli.main(["compare", str(runs["a"]), str(lora), str(runs["lr"]), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "lora.r: 4 in a, 8 in lora, 4 in lr" in line and "learning_rate" in line
    assert not out.exists()


@pytest.mark.parametrize("case", ["no metrics", "unfinished", "no runs", "one run", "tolerance"])
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, case):
    args = {
        "no metrics": [str(runs["a"]), str(tmp_path)],
        "unfinished": [str(runs["a"]), "UNFINISHED"],
        "no runs": [],
        "one run": [str(runs["a"])],
        "tolerance": [str(runs["a"]), str(runs["b"]), "--adapter-tol", "nan"],
    }[case]
    if case == "unfinished":
        unfinished = tmp_path / "unfinished"
        shutil.copytree(runs["b"], unfinished, ignore=shutil.ignore_patterns("run.json"))
        args[1] = str(unfinished)
    expected = {"no metrics": f"{tmp_path / 'metrics.jsonl'}: not found", "unfinished": "run.json: not found: the run has not finished",
                "no runs": "0 run directories given", "one run": "1 run directory given", "tolerance": "--adapter-tol nan"}[case]
    out = tmp_path / "out"
    assert cli.main(["compare", *args, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
    assert captured.out == "" and not out.exists()
