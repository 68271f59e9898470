"""Two "machines" on one host: examples/slurm_multinode.sh with accelerate_configs/multinode_deepspeed_zero3.yaml,
as `sbatch` would run it, with stand-ins for SLURM's `srun` (one launcher per node, SLURM_NODEID set) and
`scontrol` (the node list), one process per node, DeepSpeed on its CPU accelerator (gloo).

What it shows: the script's arguments, the multi-node yaml (machine rank, rendezvous at the main node,
the standard multinode launcher) and qwenloop across machines (each rank is local rank 0 of its own
machine) train the same model a single process does; bf16 comes from the yaml's DeepSpeed JSON.

And, with a stand-in for `accelerate` too (it records its arguments), that the script hands every argument
over intact: an override holding `$(...)`, a quote or a space is neither run nor split.
"""

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import (REPO, _free_port, assert_adapter_loads_whole, base_config, read_metrics, train_in_process, train_losses,
                      write_yaml)

STEPS = dict(max_steps=3, gradient_accumulation_steps=2, learning_rate=5e-3)

SRUN = """#!/usr/bin/env bash
# SLURM's srun on one host: the command once per node, concurrently, with SLURM_NODEID set.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
echo localhost
"""


def write_executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
def test_slurm_script_two_nodes_trains_like_one_process(tmp_path, tiny_model, train_jsonl):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    write_executable(stubs / "srun", SRUN)
    write_executable(stubs / "scontrol", SCONTROL)
    out = tmp_path / "run"
    # max_steps 5 in the file, 3 from the command line: the script passes overrides on.
    cfg = write_yaml(tmp_path / "train.yaml", base_config(tiny_model, train_jsonl, out, micro_batch_size=2, **{**STEPS, "max_steps": 5}))
    env = {**os.environ, "PATH": f"{stubs}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_NODELIST": "localhost",
           "MAIN_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(["bash", "examples/slurm_multinode.sh", "accelerate_configs/multinode_deepspeed_zero3.yaml",
                           str(cfg), "--max_steps", "3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]

    info = json.loads((out / "run.json").read_text())
    assert info["backend"] == "deepspeed" and info["precision"] == "bf16"
    assert info["world_size"] == 2 and info["local_rank_per_rank"] == [0, 0]  # two machines, one rank each
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3]

    single = tmp_path / "single"
    train_in_process(base_config(tiny_model, train_jsonl, single, micro_batch_size=4, **STEPS))
    # bf16 against fp32: the bound of tests/test_parity_bf16.py.
    assert train_losses(out) == pytest.approx(train_losses(single), rel=5e-3)
    assert_adapter_loads_whole(out / "adapter", tiny_model)


ACCELERATE = """#!/usr/bin/env bash
# Records its arguments, NUL-separated, one file per node.
printf '%s\\0' "$@" > "$ARGV_DIR/node-$SLURM_NODEID"
"""

INJECTION = "$(touch PWNED)"


@pytest.mark.parametrize("overrides, expected", [
    (["--output_dir", f"runs/{INJECTION}`touch PWNED`"], {"output_dir": f"runs/{INJECTION}`touch PWNED`"}),
    (["--output_dir", "runs/it's"], {"output_dir": "runs/it's"}),
    (["--lora.target_modules", "[q_proj, v_proj]"], {"target_modules": ["q_proj", "v_proj"]}),
    (["--output_dir", f"runs/it's {INJECTION} \"x\"", "--lora.target_modules", "[q_proj, v_proj]", "--max_steps=3"],
     {"output_dir": f"runs/it's {INJECTION} \"x\"", "target_modules": ["q_proj", "v_proj"], "max_steps": 3}),
], ids=["command-substitution", "quote", "list-with-space", "all-at-once"])
def test_slurm_script_passes_overrides_intact(tmp_path, overrides, expected):
    stubs, argv_dir, launch_dir = tmp_path / "bin", tmp_path / "argv", tmp_path / "launch"
    for d in (stubs, argv_dir, launch_dir):
        d.mkdir()
    write_executable(stubs / "srun", SRUN)
    write_executable(stubs / "scontrol", SCONTROL)
    write_executable(stubs / "accelerate", ACCELERATE)
    accelerate_yaml = str(REPO / "accelerate_configs" / "multinode_deepspeed_zero3.yaml")
    cfg = write_yaml(tmp_path / "train config.yaml", {"model": "m", "train_file": "t.jsonl"})  # a space in its path too
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "ARGV_DIR": str(argv_dir), "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "node[01-02]", "MAIN_PORT": "29555"}
    proc = subprocess.run(["bash", str(REPO / "examples" / "slurm_multinode.sh"), accelerate_yaml, str(cfg), *overrides],
                          cwd=launch_dir, env=env, capture_output=True, text=True, timeout=60)

    assert not [p for p in (launch_dir, tmp_path, REPO) if (p / "PWNED").exists()], "an override ran a command"
    assert proc.returncode == 0, proc.stderr
    for node in (0, 1):
        argv = (argv_dir / f"node-{node}").read_bytes().decode().split("\0")[:-1]
        launcher, script = argv[:argv.index("-m")], argv[argv.index("-m"):]
        assert launcher[0] == "launch" and dict(zip(launcher[1::2], launcher[2::2])) == {
            "--machine_rank": str(node), "--config_file": accelerate_yaml, "--num_machines": "2", "--num_processes": "16",
            "--main_process_ip": "localhost", "--main_process_port": "29555"}
        assert script == ["-m", "qwenloop", "train", str(cfg), *overrides]

    from qwenloop import TrainConfig  # and qwenloop reads them as typed

    received = TrainConfig.from_yaml(cfg, overrides)
    assert {key: getattr(received.lora if key == "target_modules" else received, key) for key in expected} == expected
