"""How a run is launched, read once into a ``LaunchSpec``: from an accelerate config file (``qwenloop doctor``,
``qwenloop plan``) or from a live ``Accelerator`` (``train()``), so both run the same checks on the same facts.

Reading a YAML follows what accelerate 1.x itself does (``accelerate/commands/config/config_args.py``,
``commands/launch.py``, ``utils/launch.py``, ``utils/dataclasses.py``):

* ``distributed_type`` picks the launcher. ``NO`` (and ``MULTI_CPU`` without mpirun) goes through the
  *simple* launcher, which starts one process whatever ``num_processes`` says; ``MULTI_GPU``, ``FSDP`` and
  ``DEEPSPEED`` start ``num_processes`` processes through torchrun. ``use_cpu`` is passed on to the
  processes by the simple launcher only (``ACCELERATE_USE_CPU``): the torchrun launchers drop it.
* ``deepspeed_config.deepspeed_config_file`` is opened by each process relative to its working
  directory (the launch directory), as here. With it, accelerate refuses a ``mixed_precision`` and the
  ``gradient_accumulation_steps`` / ``gradient_clipping`` / ``zero_stage`` / ``offload_*`` /
  ``zero3_save_16bit_model`` fields in the YAML ("will be ignored"); without it, accelerate builds the
  DeepSpeed config from those YAML fields (``DeepSpeedPlugin.__post_init__``), as ``_ds_config_from_yaml`` does.
* The DeepSpeed JSON's ``fp16.enabled`` / ``bf16.enabled`` decide the precision (``AcceleratorState.mixed_precision``).
* ``fsdp_config`` keys may be written with or without the ``fsdp_`` prefix; missing ones take the
  launcher's defaults (``fsdp_version`` 1, ``fsdp_use_orig_params`` true, ...).

No torch import here: ``qwenloop doctor`` / ``plan`` read a launch on any laptop.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import yaml

from .errors import UserError

KNOWN_DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP")
TORCHRUN_TYPES = ("MULTI_GPU", "DEEPSPEED", "FSDP")  # launched by torchrun / deepspeed: num_processes processes

# accelerate's launch defaults for FSDP (``accelerate launch --help``), used for keys a YAML leaves out.
FSDP_LAUNCH_DEFAULTS = {
    "version": 1, "use_orig_params": True, "activation_checkpointing": False, "cpu_ram_efficient_loading": True,
    "sync_module_states": True, "offload_params": False, "reshard_after_forward": True, "sharding_strategy": "FULL_SHARD",
}

# Fields of an accelerate YAML's deepspeed_config that accelerate refuses next to a deepspeed_config_file
# (``DeepSpeedPlugin._deepspeed_config_checks``; ``mixed_precision`` is a top-level field).
DS_FIELDS_REFUSED_WITH_JSON = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                               "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                               "zero3_save_16bit_model")


@dataclass(frozen=True)
class LaunchSpec:
    """Where and how a run executes: backend, processes, precision, the backend's own settings."""

    source: str
    """The accelerate config path, or ``"accelerator"`` when read from a live Accelerator."""
    backend: str
    """``single`` / ``ddp`` / ``zero3`` / ``fsdp1`` / ``fsdp2`` (``qwenloop.plan.states.BACKENDS``); another
    DeepSpeed stage: ``deepspeed`` (see ``zero_stage``)."""
    num_processes: int
    """Processes of the one training group (all machines)."""
    num_machines: int
    mixed_precision: str
    """Effective ``no`` / ``fp16`` / ``bf16``: the DeepSpeed JSON's ``fp16/bf16.enabled`` wins over the YAML."""
    use_cpu: bool
    ds_config: dict | None = None
    """The DeepSpeed config as read (None when not DeepSpeed). A live one belongs to accelerate: read, never write."""
    ds_config_file: str | None = None
    zero_stage: int | None = None
    zero3_init_flag: bool = False
    offload_optimizer: bool = False
    """DeepSpeed ``offload_optimizer.device`` is ``cpu`` / ``nvme``."""
    offload_param: bool = False
    fsdp: dict = field(default_factory=dict)
    """Normalized FSDP settings: version, use_orig_params, activation_checkpointing, cpu_ram_efficient_loading,
    sync_module_states, offload_params, reshard_after_forward, sharding_strategy."""
    distributed_type: str = "NO"
    """accelerate's ``DistributedType`` value (``NO``, ``MULTI_GPU``, ``DEEPSPEED``, ``FSDP``, ...)."""
    launched_processes: int = 1
    """Processes the launcher starts in all: from a YAML, what ``accelerate launch`` would start; live, ``WORLD_SIZE``.
    More than ``num_processes`` means processes that do not form one group."""
    yaml_mixed_precision: str | None = None
    """``mixed_precision`` as written in the YAML (None when absent, and for a live Accelerator)."""
    yaml_ds_fields: tuple = ()
    """``deepspeed_config`` fields of the YAML that accelerate refuses next to a ``deepspeed_config_file``."""

    @property
    def gpus_per_node(self) -> int:
        """Processes (one GPU each) per machine."""
        return max(1, self.num_processes // max(1, self.num_machines))

    @property
    def sharded(self) -> bool:
        """The frozen base is sharded across ranks (ZeRO-3, FSDP)."""
        return self.backend in ("zero3", "fsdp1", "fsdp2")

    def where(self, field_name: str = "") -> str:
        """``file: field`` for a message (``accelerate config`` when read from a live Accelerator)."""
        origin = "accelerate config" if self.source == "accelerator" else self.source
        return f"{origin}: {field_name}" if field_name else origin

    def ds_where(self, key: str) -> str:
        """Where a DeepSpeed setting comes from: the JSON file, or the YAML's deepspeed_config when there is none."""
        if self.ds_config_file:
            return f"{self.ds_config_file}: {key}"
        return f"{self.where('deepspeed_config')}: {key}"


def single_process_launch() -> LaunchSpec:
    """What ``qwenloop train my.yaml`` runs without ``accelerate launch``: one process, no mixed precision."""
    return LaunchSpec(source="no accelerate config (one process)", backend="single", num_processes=1, num_machines=1,
                      mixed_precision="no", use_cpu=False)


# --------------------------------------------------------------------------------------------------
# From an accelerate YAML
# --------------------------------------------------------------------------------------------------

def read_launch_config(path: str | os.PathLike) -> LaunchSpec:
    """The launch an accelerate config file describes (and the DeepSpeed JSON it names, relative to the CWD)."""
    path = os.fspath(path)
    raw = _read_yaml(path)
    kind = str(raw.get("distributed_type", "")).upper()
    if kind not in KNOWN_DISTRIBUTED_TYPES:
        raise UserError(f"{path}: distributed_type: {raw.get('distributed_type')!r} is not one qwenloop runs; use one of "
                        f"{', '.join(KNOWN_DISTRIBUTED_TYPES)} (NO: one process)")
    machines = _positive_int(raw.get("num_machines", 1), path, "num_machines")
    processes = _num_processes(raw, kind, path)
    use_cpu = _flag(raw.get("use_cpu", False), path, "use_cpu")
    yaml_precision = raw.get("mixed_precision")
    yaml_precision = None if yaml_precision is None else str(yaml_precision).lower()
    common = dict(source=path, num_processes=processes, num_machines=machines, use_cpu=use_cpu, distributed_type=kind,
                  launched_processes=processes if kind in TORCHRUN_TYPES else 1, yaml_mixed_precision=yaml_precision)
    if kind == "DEEPSPEED":
        return _deepspeed_spec(raw, path, common)
    precision = yaml_precision or "no"
    if kind == "FSDP":
        fsdp = _fsdp_settings(raw.get("fsdp_config") or {}, path)
        return LaunchSpec(backend=f"fsdp{fsdp['version']}", mixed_precision=precision, fsdp=fsdp, **common)
    backend = "ddp" if processes > 1 and kind in ("MULTI_GPU", "MULTI_CPU") else "single"
    return LaunchSpec(backend=backend, mixed_precision=precision, **common)


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: accelerate config file not found; pass the YAML you give `accelerate launch --config_file` "
                        f"(examples in accelerate_configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of accelerate config fields, got {type(raw).__name__}")
    _refuse_unknown_fields(raw, path)
    return raw


def _refuse_unknown_fields(raw: dict, path: str) -> None:
    """accelerate refuses a config file with unknown keys ("had unknown keys"); say which, with the closest."""
    import difflib

    from accelerate.commands.config.config_args import ClusterConfig  # imported here: accelerate imports torch

    known = set(ClusterConfig.__dataclass_fields__) | {"fp16", "dynamo_backend"}  # old spellings it converts
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "remove it"
            raise UserError(f"{path}: unknown field {key!r} (accelerate refuses the file); {hint}")


def _num_processes(raw: dict, kind: str, path: str) -> int:
    if "num_processes" not in raw:
        if kind == "NO":
            return 1
        raise UserError(f"{path}: num_processes is not set; set it to the total number of processes (one per GPU, "
                        f"all machines together): accelerate refuses to launch without it")
    return _positive_int(raw["num_processes"], path, "num_processes")


def _deepspeed_spec(raw: dict, path: str, common: dict) -> LaunchSpec:
    section = raw.get("deepspeed_config") or {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: deepspeed_config: expected a mapping, got {section!r}")
    json_file = section.get("deepspeed_config_file")
    if json_file:
        ds = _read_ds_json(str(json_file), path)
        refused = tuple(k for k in DS_FIELDS_REFUSED_WITH_JSON if k in section)
    else:
        ds, refused = _ds_config_from_yaml(section, path), ()
    stage = ds["zero_optimization"].get("stage")
    stage = int(stage) if isinstance(stage, (int, float)) else None
    # accelerate: zero3_init_flag defaults to "is ZeRO-3", and is switched off (with a warning) below stage 3.
    asked = section.get("zero3_init_flag")
    init_flag = stage == 3 and (asked is None or _flag(asked, path, "deepspeed_config.zero3_init_flag"))
    precision = _ds_precision(ds, common["yaml_mixed_precision"])
    return LaunchSpec(backend="zero3" if stage == 3 else "deepspeed", mixed_precision=precision, ds_config=ds,
                      ds_config_file=str(json_file) if json_file else None, zero_stage=stage, zero3_init_flag=init_flag,
                      offload_optimizer=_offloaded(ds, "offload_optimizer"), offload_param=_offloaded(ds, "offload_param"),
                      yaml_ds_fields=refused, **common)


def _read_ds_json(json_file: str, yaml_path: str) -> dict:
    where = f"{yaml_path}: deepspeed_config.deepspeed_config_file"
    if not os.path.isfile(json_file):
        raise UserError(f"{where}: {json_file} not found (accelerate opens it relative to the directory you launch from, "
                        f"here {os.getcwd()}); run from the directory it is relative to, or give an absolute path")
    try:
        with open(json_file, encoding="utf-8") as f:
            ds = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{json_file}: not a valid DeepSpeed JSON ({e}); fix the syntax")
    if not isinstance(ds, dict):
        raise UserError(f"{json_file}: expected a JSON object of DeepSpeed settings, got {type(ds).__name__}")
    if not isinstance(ds.get("zero_optimization"), dict):
        raise UserError(f"{json_file}: no zero_optimization section (accelerate refuses a DeepSpeed config without one); "
                        f"add \"zero_optimization\": {{\"stage\": 3}}")
    # What accelerate's DeepSpeedPlugin does to the file before anything runs (its environment defaults).
    ds.setdefault("gradient_accumulation_steps", 1)
    zero = ds["zero_optimization"]
    if zero.get("stage") == "auto":
        zero["stage"] = 2
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict) and zero[key].get("device") == "auto":
            zero[key]["device"] = "none"
    return ds


def _ds_config_from_yaml(section: dict, path: str) -> dict:
    """The config accelerate builds from the YAML's deepspeed_config fields when there is no JSON file."""
    stage = section.get("zero_stage", 2)
    if stage not in (0, 1, 2, 3):
        _bad(path, "deepspeed_config.zero_stage", stage, "0, 1, 2 or 3")
    config = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": section.get("gradient_accumulation_steps", "auto"),
        "zero_optimization": {
            "stage": stage,
            "offload_optimizer": {"device": str(section.get("offload_optimizer_device", "none")).lower()},
            "offload_param": {"device": str(section.get("offload_param_device", "none")).lower()},
        },
    }
    if section.get("gradient_clipping") not in (None, "auto"):
        config["gradient_clipping"] = section["gradient_clipping"]
    return config


def _ds_precision(ds: dict, yaml_precision: str | None) -> str:
    """``AcceleratorState.mixed_precision`` under DeepSpeed: the JSON's enabled flags; "auto" follows the launch."""
    for name in ("fp16", "bf16"):
        if (ds.get(name) or {}).get("enabled") is True:
            return name
    for name in ("fp16", "bf16"):
        if (ds.get(name) or {}).get("enabled") == "auto" and yaml_precision == name:
            return name
    return "no" if any(k in ds for k in ("fp16", "bf16")) else (yaml_precision or "no")


def _offloaded(ds: dict, key: str) -> bool:
    device = ((ds.get("zero_optimization") or {}).get(key) or {}).get("device")
    return str(device).lower() in ("cpu", "nvme")


def _fsdp_settings(section: dict, path: str) -> dict:
    if not isinstance(section, dict):
        raise UserError(f"{path}: fsdp_config: expected a mapping, got {section!r}")
    raw = {k.removeprefix("fsdp_"): v for k, v in section.items()}
    out = dict(FSDP_LAUNCH_DEFAULTS)
    for key, default in FSDP_LAUNCH_DEFAULTS.items():
        if key not in raw:
            continue
        if isinstance(default, bool):
            out[key] = _flag(raw[key], path, f"fsdp_config.fsdp_{key}")
        elif key == "version":
            out[key] = int(raw[key]) if str(raw[key]) in ("1", "2") else _bad(path, "fsdp_config.fsdp_version", raw[key], "1 or 2")
        else:
            out[key] = str(raw[key])
    return out


def _flag(value, path: str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", "none"):
        return False
    return _bad(path, name, value, "true or false")


def _positive_int(value, path: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return _bad(path, name, value, "a positive integer")
    return value


def _bad(path: str, name: str, value, expected: str):
    raise UserError(f"{path}: {name}: expected {expected}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# From a live Accelerator
# --------------------------------------------------------------------------------------------------

def launch_from_accelerator(accelerator) -> LaunchSpec:
    """The same facts from a built ``Accelerator`` (its state and plugins), for ``train()``'s checks.

    Also accepts a stand-in with ``state.fsdp_plugin`` / ``state.deepspeed_plugin`` and no ``distributed_type``
    (tests/fsdp_worker.py, which does accelerate's FSDP preparation by hand on CPU).
    """
    state = accelerator.state
    ds_plugin = getattr(state, "deepspeed_plugin", None)
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    kind = getattr(accelerator, "distributed_type", None)
    kind = getattr(kind, "value", kind) or ("DEEPSPEED" if ds_plugin else "FSDP" if fsdp_plugin else "NO")
    processes = int(accelerator.num_processes)
    launched = int(os.environ.get("WORLD_SIZE", processes))
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", launched) or 1)
    common = dict(source="accelerator", num_processes=processes, num_machines=max(1, -(-launched // max(1, per_machine))),
                  mixed_precision=str(accelerator.mixed_precision), use_cpu=_device_type(accelerator) == "cpu",
                  distributed_type=str(kind), launched_processes=launched)
    if kind == "DEEPSPEED" and ds_plugin is not None:
        ds = ds_plugin.deepspeed_config
        stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        return LaunchSpec(backend="zero3" if stage == 3 else "deepspeed", ds_config=ds,
                          ds_config_file=os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None, zero_stage=stage,
                          zero3_init_flag=bool(getattr(ds_plugin, "zero3_init_flag", False)),
                          offload_optimizer=_offloaded(ds, "offload_optimizer"), offload_param=_offloaded(ds, "offload_param"),
                          **common)
    if kind == "FSDP" and fsdp_plugin is not None:
        fsdp = _fsdp_from_plugin(fsdp_plugin)
        return LaunchSpec(backend=f"fsdp{fsdp['version']}", fsdp=fsdp, **common)
    return LaunchSpec(backend="ddp" if processes > 1 else "single", **common)


def _device_type(accelerator) -> str:
    device = getattr(accelerator, "device", None)
    return getattr(device, "type", str(device or "cpu"))


def _fsdp_from_plugin(plugin) -> dict:
    version = int(getattr(plugin, "fsdp_version", 1) or 1)
    offload = getattr(plugin, "cpu_offload", None)
    # FSDP1: CPUOffload(offload_params=...); FSDP2: an OffloadPolicy, CPUOffloadPolicy when offloading.
    offload_params = bool(getattr(offload, "offload_params", False)) or type(offload).__name__ == "CPUOffloadPolicy"
    strategy = getattr(plugin, "sharding_strategy", None)
    return {
        "version": version,
        "use_orig_params": True if version == 2 else bool(getattr(plugin, "use_orig_params", False)),
        "activation_checkpointing": bool(getattr(plugin, "activation_checkpointing", False)),
        "cpu_ram_efficient_loading": bool(getattr(plugin, "cpu_ram_efficient_loading", False)),
        "sync_module_states": bool(getattr(plugin, "sync_module_states", False)),
        "offload_params": offload_params,
        "reshard_after_forward": bool(getattr(plugin, "reshard_after_forward", True)),
        "sharding_strategy": getattr(strategy, "name", str(strategy)) if strategy is not None else "FULL_SHARD",
    }
