"""The launch itself (do the processes form one group, one per GPU?) and whether the plan fits the GPU."""

from __future__ import annotations

from ..errors import UserError
from . import CheckContext, error, warning

CPU_RECIPE = ("for a multi-process CPU run use distributed_type: MULTI_GPU without use_cpu, launched with "
              "ACCELERATE_USE_CPU=true (accelerate refuses FSDP on a CPU)")


def check_process_group(ctx: CheckContext):
    launch = ctx.launch
    if launch is None:
        return
    yield from _live_group(launch)
    if launch.source != "accelerator":
        yield from _yaml_group(launch)
    if launch.num_processes % launch.num_machines:
        yield error(f"{launch.where('num_processes')}: {launch.num_processes} processes do not divide over "
                    f"num_machines {launch.num_machines} (accelerate starts num_processes // num_machines on each "
                    f"machine); set num_processes to a multiple of {launch.num_machines}")
    if ctx.gpu_count is not None and not ctx.on_cpu and launch.gpus_per_node > ctx.gpu_count:
        yield error(f"{launch.where('num_processes')}: {launch.gpus_per_node} processes per machine but {ctx.gpu_count} "
                    f"GPU(s) visible here; run one process per GPU (num_processes: {ctx.gpu_count * launch.num_machines}) "
                    f"or make the GPUs visible (CUDA_VISIBLE_DEVICES)")


def _live_group(launch):
    """Inside a launched process: the launcher's WORLD_SIZE must be the group accelerate formed."""
    started = launch.launched_processes
    if started > 1 and (launch.distributed_type == "NO" or launch.num_processes != started):
        yield error(f"{launch.where()}: the launcher started {started} processes but they do not form one group (this "
                    f"one sees {launch.num_processes}, distributed type {launch.distributed_type}): each would train "
                    f"alone on its own copy of the model; on GPUs remove use_cpu from the accelerate config; {CPU_RECIPE}")


def _yaml_group(launch):
    """What ``accelerate launch`` would start from this YAML."""
    n, kind = launch.num_processes, launch.distributed_type
    if launch.use_cpu and n > 1 and kind in ("MULTI_GPU", "FSDP"):
        yield error(f"{launch.where('use_cpu')}: is true with distributed_type {kind} and {n} processes, but accelerate's "
                    f"multi-process launcher drops use_cpu: without GPUs each of the {n} processes trains alone, with "
                    f"GPUs they train on the GPUs; remove use_cpu for a GPU run; {CPU_RECIPE}")
    elif launch.use_cpu and kind == "DEEPSPEED":
        yield warning(f"{launch.where('use_cpu')}: is ignored by accelerate's DeepSpeed launcher (the processes use the "
                      f"GPUs when there are any); remove it (DeepSpeed on a CPU: DS_ACCELERATOR=cpu)")
    if kind == "NO" and n > 1:
        yield error(f"{launch.where('num_processes')}: is {n}, but distributed_type NO starts one process (accelerate's "
                    f"single-process launcher); use distributed_type MULTI_GPU, DEEPSPEED or FSDP for {n} processes, or "
                    f"num_processes: 1")


PLAN_MARGIN = 0.10
"""The planner's target accuracy (within 10% of a measured peak): a run predicted over the GPU by more than
this is stopped; one within it, or with less than this to spare, gets a warning."""


def check_plan_fits(ctx: CheckContext):
    """The memory plan of this run on its GPU (``qwenloop plan`` for every term). Needs a known GPU and model shapes."""
    launch, gpu = ctx.launch, ctx.gpu
    if launch is None or gpu is None or ctx.on_cpu or launch.backend == "deepspeed":
        return  # ZeRO stages other than 3 are not planned (check_deepspeed_stage speaks about them)
    from ..plan.advice import suggestions
    from ..plan.run import plan_run
    from ..plan.shapes import spec_from_config

    try:
        model = spec_from_config(ctx.model_config, name=ctx.cfg.model) if ctx.model_config else None
        plan = plan_run(ctx.cfg, launch, gpu, model=model)
    except UserError:
        return  # shapes the planner does not know (a hub id that is no preset, a MoE model): nothing to say
    memory = gpu.memory_bytes
    if plan.fits and plan.spare >= PLAN_MARGIN * memory:
        return
    fixes = "; ".join(s.line() for s in suggestions(plan, limit=3)) or "no single change found"
    where = f"{ctx.cfg_source} with {launch.where()} on {gpu.name} ({ctx.gpu_origin or 'GPU'})"
    if plan.host_fits is False or plan.required > (1 + PLAN_MARGIN) * memory:
        yield error(f"{where}: {plan.verdict}; changes that fit: {fixes} (qwenloop plan --config ... shows every term)")
    elif not plan.fits:  # within the estimate's own uncertainty: say so, do not stop a run that may well fit
        yield warning(f"{where}: {plan.verdict}, within the plan's {PLAN_MARGIN:.0%} margin: it may run out of memory; "
                      f"changes that fit: {fixes}")
    else:
        yield warning(f"{where}: {plan.verdict}: less than {PLAN_MARGIN:.0%} of the GPU to spare, within the plan's "
                      f"margin (longer sequences or a fragmented allocator may not fit)")
