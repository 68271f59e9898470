"""`qwenloop plot` and report.md (qwenloop/report.py) on a real run of the tiny model: the figure's panels and the
data they draw (checked on the Figure before it is saved), the PNG, the report's numbers against the run's files,
finish_run (what train() calls at the end of a run) never failing, the command line a run records, and bad input
(one line, exit code 2, nothing written)."""

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from conftest import base_config, read_metrics, train_in_process

pytest.importorskip("matplotlib")

from qwenloop import cli  # noqa: E402
from qwenloop.report import command_line, curves_figure, finish_run, plot_run, report_markdown  # noqa: E402
from qwenloop.runlog import load_run  # noqa: E402

PANELS = ["loss", "learning rate", "tokens/s", "gradient norm"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model, train_jsonl) -> Path:
    """4 steps, evaluated at step 2 (on a training line) and at the end (a line of its own): ~2 s."""
    out = tmp_path_factory.mktemp("report") / "run"
    train_in_process(base_config(tiny_model, train_jsonl, out, eval_file=train_jsonl, eval_every_steps=2))
    WRITTEN_BY_TRAIN.extend(sorted(p.name for p in out.iterdir()))  # before any test here rewrites the plots
    return out


WRITTEN_BY_TRAIN: list[str] = []


def copy_run(src: Path, dst: Path, edit_metrics=None, edit_info=None) -> Path:
    """A copy of a run directory (without its plots) with its metrics lines or run.json changed."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("curves.png", "report.md"))
    if edit_metrics:
        lines = [edit_metrics(m) for m in read_metrics(dst)]
        (dst / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if edit_info:
        info = json.loads((dst / "run.json").read_text())
        (dst / "run.json").write_text(json.dumps(edit_info(info)))
    return dst


def line_data(ax, label):
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return list(line.get_xdata()), list(line.get_ydata())


def test_the_figure_draws_the_runs_metrics(run_dir):
    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert len(steps) == 4 and [m["step"] for m in evals] == [2, 4]  # the run is what the test assumes
    fig = curves_figure(load_run(run_dir))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == PANELS
    loss, lr, speed, grad = axes
    assert line_data(loss, "train loss") == ([1, 2, 3, 4], [m["loss"] for m in steps])
    assert line_data(loss, "eval loss") == ([2, 4], [m["eval_loss"] for m in evals])
    assert list(lr.get_lines()[0].get_ydata()) == [m["lr"] for m in steps]
    assert line_data(speed, "tokens/s (all non-padding)")[1] == [m["tokens_per_s"] for m in steps]
    assert line_data(speed, "target tokens/s (loss tokens)")[1] == [m["target_tokens_per_s"] for m in steps]
    assert line_data(grad, "gradient norm")[1] == [m["grad_norm"] for m in steps]
    assert line_data(grad, "max_grad_norm 1")[1] == [1.0, 1.0]  # the clipping threshold of config.yaml
    assert not any(ln.get_label() == "skipped step" for ax in axes for ln in ax.get_lines())
    assert all(ax.get_xlabel() == "step" for ax in axes)


def test_fp16_runs_get_the_loss_scale_panel_and_skipped_steps(run_dir, tmp_path):
    """fp16 loss scaling needs a GPU (accelerate makes no GradScaler on CPU): the real run's metrics are given the
    keys an fp16 run logs, a scale halved at an overflow whose step was skipped (no grad norm)."""
    scales = {1: 65536.0, 2: 65536.0, 3: 32768.0, 4: 32768.0}

    def fp16(m):
        if "loss" not in m:
            return m
        m = {**m, "loss_scale": scales[m["step"]], "skipped": m["step"] == 3}
        return {**m, "grad_norm": float("inf")} if m["step"] == 3 else m

    fig = curves_figure(load_run(copy_run(run_dir, tmp_path / "fp16", edit_metrics=fp16)))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == PANELS + ["loss scale (fp16)"]
    scale = axes[4]
    assert scale.get_yscale() == "log"
    assert line_data(scale, "loss scale") == ([1, 2, 3, 4], [65536.0, 65536.0, 32768.0, 32768.0])
    assert line_data(scale, "skipped (overflow)") == ([3], [32768.0])
    assert line_data(axes[0], "skipped step")[0] == [3, 3]  # a vertical mark at step 3 on the loss panel
    assert line_data(axes[3], "gradient norm")[0] == [1, 2, 4]  # the infinite norm is not drawn, only marked


def test_plot_writes_a_png_and_the_report(run_dir, capsys):
    from PIL import Image

    for name in ("curves.png", "report.md"):
        (run_dir / name).unlink(missing_ok=True)
    assert cli.main(["plot", str(run_dir)]) == 0
    assert capsys.readouterr().out.split() == [str(run_dir / "curves.png"), str(run_dir / "report.md")]
    with Image.open(run_dir / "curves.png") as img:
        assert img.format == "PNG" and img.size == (1200, 720)  # 12 x 7.2 inches at 100 dpi: 2 x 2 panels
        img.verify()
    assert "![curves](curves.png)" in (run_dir / "report.md").read_text()


def test_the_report_states_the_runs_numbers(run_dir, tmp_path):
    import yaml

    command = "cd /somewhere && ACCELERATE_USE_DEEPSPEED=true python -m qwenloop train 'my job.yaml'"
    copy = copy_run(run_dir, tmp_path / "with-command", edit_info=lambda info: {**info, "command": command})
    info = json.loads((copy / "run.json").read_text())
    metrics = read_metrics(copy)
    final = [m for m in metrics if "eval_loss" in m][-1]
    best = min((m for m in metrics if "eval_loss" in m), key=lambda m: m["eval_loss"])
    text = report_markdown(load_run(copy))
    rows = dict(line.strip("|").split(" | ", 1) for line in text.splitlines() if line.startswith("| ") and " | " in line)
    rows = {k.strip(): v.strip(" |") for k, v in rows.items()}
    assert rows["backend"] == "single" and rows["world size"] == "1" and rows["status"] == "finished"
    assert rows["precision"].startswith("fp32")
    assert rows["final eval loss"] == f"{final['eval_loss']:.4f}, perplexity {final['eval_ppl']:.4g} (step 4)"
    assert rows["best eval loss"].startswith(f"{best['eval_loss']:.4f}")
    assert rows["tokens seen"] == f"{info['tokens_seen']:,} ({info['target_tokens_seen']:,} of them loss targets)"
    assert rows["time"] == f"{info['wall_seconds']:.1f} s (wall)"  # train() records loading and saving too
    assert rows["peak memory per rank"] == f"rank 0: {info['peak_memory_per_rank'][0]['rss_gib']:.2f} GiB (CPU peak RSS)"
    assert f"```bash\n{command}\n```" in text
    config_text = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(config_text) == yaml.safe_load((copy / "config.yaml").read_text())


def test_finish_run_writes_both_and_never_fails(run_dir, tmp_path, monkeypatch, caplog):
    ok = copy_run(run_dir, tmp_path / "ok")
    assert finish_run(str(ok)) == [str(ok / "curves.png"), str(ok / "report.md")]
    # Without matplotlib: the report only, and the log says how to get the curves.
    bare = copy_run(run_dir, tmp_path / "bare")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert finish_run(str(bare)) == [str(bare / "report.md")]
    assert not (bare / "curves.png").exists()
    monkeypatch.delitem(sys.modules, "matplotlib")
    # A plotting bug: logged, the report still written, nothing raised.
    broken = copy_run(run_dir, tmp_path / "broken")
    monkeypatch.setattr("qwenloop.report.curves_figure", lambda run: 1 / 0)
    assert finish_run(str(broken)) == [str(broken / "report.md")]
    assert "curves.png not written: ZeroDivisionError" in caplog.text
    assert not list(broken.glob("*.tmp-*"))


def test_command_line_is_one_shell_line_that_runs_as_it_reads():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_DYNAMO_MODE": "default",
           "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_PORT": "29500", "HOME": "/root"}
    argv = ["/x/site-packages/qwenloop/__main__.py", "train", "my job.yaml", "--output_dir", "$(touch PWNED)"]
    line = command_line(argv, env, cwd="/work/dir a")
    assert line == ("cd '/work/dir a' && ACCELERATE_USE_DEEPSPEED=true WORLD_SIZE=2 python -m qwenloop train "
                    "'my job.yaml' --output_dir '$(touch PWNED)'")
    words = shlex.split(line)
    assert words[words.index("qwenloop") + 1:] == argv[1:]  # every argument comes back as it was given
    assert command_line(["/usr/bin/qwenloop", "train", "a.yaml"], {}, cwd="/w") == "cd /w && qwenloop train a.yaml"
    assert command_line(["examples/finetune.py"], {}, cwd="/w") == "cd /w && python examples/finetune.py"


def test_a_run_writes_its_report_and_curves(run_dir):
    """train() ends with finish_run: report.md and curves.png are there without running `qwenloop plot`."""
    assert {"report.md", "curves.png"} <= set(WRITTEN_BY_TRAIN)
    assert "command" in json.loads((run_dir / "run.json").read_text())


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["plot", str(empty)]) == 2
    assert f"{empty / 'metrics.jsonl'}: not found" in one_error_line(capsys)
    assert list(empty.iterdir()) == []

    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in one_error_line(capsys)

    no_steps = copy_run(run_dir, tmp_path / "no-steps")
    (no_steps / "metrics.jsonl").write_text("")
    before = sorted(p.name for p in no_steps.iterdir())
    assert cli.main(["plot", str(no_steps)]) == 2
    assert "no training step logged yet" in one_error_line(capsys)
    assert sorted(p.name for p in no_steps.iterdir()) == before

    copy = copy_run(run_dir, tmp_path / "copy")
    before = sorted(p.name for p in copy.iterdir())
    assert cli.main(["plot", str(copy), "--out", str(tmp_path / "missing" / "c.png")]) == 2
    assert "does not exist" in one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["plot", str(copy)]) == 2
    assert "pip install 'qwenloop[plot]'" in one_error_line(capsys)
    assert sorted(p.name for p in copy.iterdir()) == before

    assert cli.main(["plot"]) == 2
    assert one_error_line(capsys).startswith("error: qwenloop plot: ")


def test_a_torn_metrics_line_is_left_out(run_dir, tmp_path):
    """A run killed while writing its last line leaves it cut short: the rest is plotted, the report says so."""
    copy = copy_run(run_dir, tmp_path / "torn")
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 7.')
    run = load_run(copy)
    assert len(run.steps) == 4 and run.dropped_lines == [6]
    assert "metrics.jsonl lines left out (not JSON): 6." in report_markdown(run)
    assert Path(plot_run(str(copy))).is_file()
