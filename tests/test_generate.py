"""`qwenloop generate`: deterministic answers through the chat template, base and adapted answers that differ after
the demo's training, prompt files, the interactive mode, and one-line errors (exit code 2) for bad input.

Everything runs in this process on the tiny model and an adapter trained on it for 30 steps (`after_training`)."""

import json

import pytest

from after_training import PROMPTS, copy_adapter, trained_adapter
from conftest import write_jsonl
from qwenloop.cli import main as cli_main


@pytest.fixture(scope="module")
def adapter(tiny_model, train_jsonl):
    return trained_adapter(tiny_model, train_jsonl)


def test_greedy_answers_repeat_and_the_adapter_changes_them(tiny_model, adapter):
    from qwenloop.generate import generate

    first = generate(tiny_model, PROMPTS, str(adapter), compare=True, max_new_tokens=16)
    again = generate(tiny_model, PROMPTS, str(adapter), compare=True, max_new_tokens=16)
    base_only = generate(tiny_model, PROMPTS, max_new_tokens=16)
    assert [(a.base, a.adapted) for a in first] == [(a.base, a.adapted) for a in again]
    # --compare's base answers (adapter switched off) are the plain model's
    assert [a.base for a in first] == [a.base for a in base_only] and all(a.adapted is None for a in base_only)
    assert sum(a.base != a.adapted for a in first) >= 2, [(a.base, a.adapted) for a in first]
    sampled = [generate(tiny_model, PROMPTS[:1], str(adapter), sample=True, seed=3, temperature=1.5, max_new_tokens=16)[0].adapted
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded per prompt


def test_prompt_file_with_references_and_jsonl_output(tiny_model, adapter, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": PROMPTS[0]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]},
                      {"role": "assistant", "content": "red blue red blue"}]},
        {"conversations": [{"from": "human", "value": PROMPTS[2]}]},
        {"instruction": "Reverse the words", "input": "a b c", "output": "c b a"},
    ])
    out = tmp_path / "answers.jsonl"
    code = cli_main(["generate", "--model", tiny_model, "--adapter", str(adapter), "--file", str(prompts),
                     "--compare", "--max-new-tokens", "8", "--json", "--output", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and printed == written and len(written) == 4
    assert all({"base", "adapted"} <= set(r) for r in written)
    assert written[1]["reference"] == "red blue red blue" and written[1]["messages"][-1]["role"] == "user"
    assert written[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert written[3]["messages"][-1]["content"] == "Reverse the words\n\na b c" and written[3]["reference"] == "c b a"
    assert "reference" not in written[0]


def test_text_output_shows_base_and_adapter_side_by_side(tiny_model, adapter, capsys):
    code = cli_main(["generate", "--model", tiny_model, "--adapter", str(adapter), "--prompt", PROMPTS[0],
                     "--compare", "--max-new-tokens", "8"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0] == f">>> {PROMPTS[0]}"
    assert lines[1].split("|")[0].strip() == "base" and lines[1].split("|")[1].strip() == "adapter"


def test_interactive_chat_keeps_history_per_side_and_resets():
    from qwenloop.generate import chat
    from qwenloop.inference import GenerationSettings

    class Recorder:  # stands in for a loaded model: records what each side was asked
        has_adapter = True
        seen = []

        def answer(self, messages, settings, use_adapter=True):
            self.seen.append(("adapter" if use_adapter else "base", [m["content"] for m in messages]))
            return f"reply{len(self.seen)}"

    inputs, output = iter(["hello", "  ", "and then?", "/reset", "fresh", "/quit", "never read"]), []
    chat(Recorder(), GenerationSettings(), compare=True, system="sys", read=lambda _: next(inputs), write=output.append)
    seen = Recorder.seen
    assert seen[0] == ("base", ["sys", "hello"]) and seen[1] == ("adapter", ["sys", "hello"])
    assert seen[2] == ("base", ["sys", "hello", "reply1", "and then?"])  # the base's own earlier answer
    assert seen[3] == ("adapter", ["sys", "hello", "reply2", "and then?"])
    assert seen[4] == ("base", ["sys", "fresh"]) and len(seen) == 6
    assert any("(new conversation)" in line for line in output)


def test_interactive_mode_needs_a_terminal(tiny_model, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert cli_main(["generate", "--model", tiny_model]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: give --prompt") and "\n" not in err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_adapter_for_another_model_is_named_tensor_by_tensor(tiny_model, adapter, tmp_path, capsys):
    wrong_shape = copy_adapter(adapter, tmp_path / "wrong-shape", reshape="layers.1.mlp.down_proj.lora_A")
    assert cli_main(["generate", "--model", tiny_model, "--adapter", str(wrong_shape), "--prompt", "x"]) == 2
    err = _one_line_error(capsys)
    assert "layers.1.mlp.down_proj.lora_A.weight" in err and "[64, 131]" in err and "[64, 128]" in err
    wrong_name = copy_adapter(adapter, tmp_path / "wrong-name", rename=("layers.1.", "layers.7."))
    assert cli_main(["generate", "--model", tiny_model, "--adapter", str(wrong_name), "--prompt", "x"]) == 2
    assert "layers.7." in _one_line_error(capsys)


@pytest.mark.parametrize("argv, expected", [
    (["--compare", "--prompt", "x"], "--compare needs --adapter"),
    (["--adapter", "/nonexistent/adapter", "--prompt", "x"], "--adapter /nonexistent/adapter: not found"),
    (["--prompt", "x", "--file", "p.jsonl"], "not allowed with argument"),
    (["--prompt", "x", "--dtype", "fp8"], "invalid choice"),
])
def test_bad_arguments_are_one_line_errors(tiny_model, argv, expected, capsys):
    assert cli_main(["generate", "--model", tiny_model, *argv]) == 2
    assert expected in _one_line_error(capsys)


def test_a_dtype_the_machine_cannot_hold_is_refused_before_loading(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr("qwenloop.merge.available_ram", lambda: 100_000)  # the tiny model is 0.5 MB in fp32
    assert cli_main(["generate", "--model", tiny_model, "--prompt", "x", "--dtype", "fp32"]) == 2
    assert "--dtype fp32: the model's weights take" in _one_line_error(capsys)
