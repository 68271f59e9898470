"""``qwenloop doctor``: every contradiction and risk of a launch, found before an hour is spent loading weights.

    qwenloop doctor --config my.yaml [--accelerate-config X.yaml] [--gpu v100-32gb] [--key value ...]

Reads the training config (with the same ``--key value`` overrides ``qwenloop train`` takes), the accelerate
config and the DeepSpeed JSON it names (relative to the current directory, as ``accelerate launch`` opens
it), the model directory's config.json (no weights) and the GPU: ``--gpu NAME`` (a ``qwenloop plan``
preset) when given, else this machine's GPUs when there are any, else none (the GPU-dependent checks are
then listed as not checked). Runs every check of ``qwenloop.checks`` (the ones ``train()`` runs before
loading) and prints all findings, errors first, each with its fix.

Exit code 0 when clean or warnings only, 2 when anything would stop the run.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from .checks import CheckContext, Finding, detect_gpu, make_context, run_checks
from .errors import CommandParser, EXIT_USAGE, UserError


@dataclass
class Examination:
    """What the doctor looked at and found."""

    findings: list[Finding] = field(default_factory=list)
    context: CheckContext | None = None
    launch_note: str = ""
    notes: list[str] = field(default_factory=list)


def doctor(config_path: str, accelerate_config: str | None = None, gpu: str | None = None,
           overrides: tuple | list = ()) -> list[Finding]:
    """Every finding for this training config + accelerate config (+ GPU preset), errors first."""
    return examine(config_path, accelerate_config, gpu, overrides).findings


def examine(config_path: str, accelerate_config: str | None = None, gpu: str | None = None,
            overrides: tuple | list = ()) -> Examination:
    from .config import TrainConfig

    out = Examination()
    try:
        cfg = TrainConfig.from_yaml(config_path, list(overrides), validate=False)  # the checks validate, all at once
    except UserError as e:  # not parseable (syntax, unknown key, wrong type): nothing else can be checked
        out.findings.append(Finding("error", "training_config", str(e)))
        return out
    launch, out.launch_note = _launch(accelerate_config, out.findings)
    spec, capability, count, origin = _gpu(gpu, out.findings)
    ctx = make_context(cfg, launch, cfg_source=config_path, gpu=spec, gpu_capability=capability, gpu_count=count,
                       gpu_origin=origin)
    out.context = ctx
    out.findings = sorted(out.findings + run_checks(ctx), key=lambda f: f.level != "error")
    out.notes = _not_checked(ctx, gpu_asked=gpu is not None)
    return out


def _launch(path: str | None, findings: list[Finding]):
    """The launch spec (None when the file cannot be read: that is a finding) and how it was chosen."""
    from .launch import read_launch_config, single_process_launch

    note = ""
    if path is None:
        from accelerate.commands.config.config_args import default_config_file

        if os.path.isfile(default_config_file):
            path, note = default_config_file, "no --accelerate-config: accelerate's default config, as `accelerate launch` would use"
        else:
            return single_process_launch(), "no --accelerate-config: one process, as `qwenloop train` alone runs"
    try:
        return read_launch_config(path), note
    except UserError as e:
        findings.append(Finding("error", "accelerate_config", str(e)))
        return None, note


def _gpu(name: str | None, findings: list[Finding]):
    """(GPUSpec, capability, GPUs visible, origin): ``--gpu`` wins (planning for another machine), else this machine's."""
    if name is not None:
        from .plan.gpus import resolve_gpu

        try:
            return resolve_gpu(name), None, None, f"--gpu {name}"
        except UserError as e:
            findings.append(Finding("error", "gpu", f"--gpu: {e}"))
            return None, None, None, ""
    detected = detect_gpu()
    if detected is None:
        return None, None, None, ""
    spec, capability, count = detected
    return spec, capability, count, "this machine's GPU"


def _not_checked(ctx: CheckContext, gpu_asked: bool) -> list[str]:
    notes = []
    if ctx.gpu is None and not ctx.on_cpu and not gpu_asked:
        notes.append("no GPU here and no --gpu NAME: bf16 support, attention kernels on the GPU, ZeRO-3 loading "
                     "against GPU memory and whether the plan fits were not checked (e.g. --gpu a100-80gb, --gpu v100-32gb)")
    if ctx.model_config is None:
        notes.append(f"model {ctx.cfg.model!r} is not a local directory with a config.json: its stored quantization was "
                     f"not checked, and its size only if it is a `qwenloop plan` preset")
    return notes


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="qwenloop doctor", allow_abbrev=False,
                      description="Every contradiction and risk of a launch, before it loads anything. Other --key "
                                  "value arguments override the training config, as for qwenloop train.",
                      hint="; usage: qwenloop doctor --config my.yaml [--accelerate-config X.yaml] [--gpu NAME] "
                           "[--key value ...]")
    p.add_argument("--config", required=True, help="the training config YAML")
    p.add_argument("--accelerate-config", help="the YAML given to `accelerate launch --config_file`")
    p.add_argument("--gpu", help="plan for this GPU (a qwenloop plan preset, e.g. v100-32gb) instead of this machine's")
    return p


def render(exam: Examination, config_path: str) -> str:
    lines = [_header(exam, config_path)]
    lines += [str(f) for f in exam.findings]
    lines += [f"not checked: {n}" for n in exam.notes]
    errors = sum(f.level == "error" for f in exam.findings)
    warnings = len(exam.findings) - errors
    if not exam.findings:
        lines.append("no problems found")
    elif errors:
        lines.append(f"{errors} error(s), {warnings} warning(s): the run would stop (or train something else than asked); "
                     f"fix the errors above")
    else:
        lines.append(f"{warnings} warning(s), no errors: the run can start")
    return "\n".join(lines)


def _header(exam: Examination, config_path: str) -> str:
    ctx = exam.context
    if ctx is None:
        return f"qwenloop doctor: {config_path}"
    text = f"qwenloop doctor: {config_path}"
    launch = ctx.launch
    if launch is not None:
        text += (f" with {launch.where()}: {launch.backend}, {launch.num_processes} process(es) on "
                 f"{launch.num_machines} machine(s), precision {launch.mixed_precision}")
    if ctx.gpu is not None:
        text += f"; GPU {ctx.gpu.name} ({ctx.gpu_origin}{f', {ctx.gpu_count} visible' if ctx.gpu_count else ''})"
    if exam.launch_note:
        text += f" [{exam.launch_note}]"
    return text


def main(argv: list[str]) -> int:
    args, rest = _parser().parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") and not a.startswith("--")]
    if stray:
        raise UserError(f"qwenloop doctor: unknown option {stray[0]}; training-config overrides are --key value")
    exam = examine(args.config, args.accelerate_config, args.gpu, rest)
    print(render(exam, args.config))
    return EXIT_USAGE if any(f.level == "error" for f in exam.findings) else 0
