"""One ZeRO-3 rank (gloo, CPU, bf16 base, fp32 LoRA r4 on all 7 projections) per case: the peak number of
gathered, non-persistent parameter elements after every fetch of training steps 2-3 (run by
tests/test_plan_estimate.py: ``python tests/zero3_gather_probe.py MODEL_DIR CASES_JSON``; prints RESULT<json>).
"""

import json, sys, torch
import deepspeed
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

deepspeed.init_distributed(dist_backend="gloo")
state = {"on": False, "peak": 0, "params": []}
fetch = PartitionedParameterCoordinator.fetch_sub_module
def spy(self, sub, forward):  # the gathered set right after each fetch (and the prefetch it starts)
    fetch(self, sub, forward)
    if state["on"]:
        live = sum(p.ds_numel for p in state["params"] if not p.ds_persist and p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
        state["peak"] = max(state["peak"], live)
PartitionedParameterCoordinator.fetch_sub_module = spy
out = []
for case in json.loads(sys.argv[2]):
    cfg = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3, **case["zero"]},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    keep = HfDeepSpeedConfig(cfg)  # from_pretrained loads under zero.Init, as accelerate makes it for qwenloop
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    if case["ckpt"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # qwenloop.model: trainable weights in fp32
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg)
    state.update(params=list(model.parameters()), peak=0)
    x = torch.randint(0, 500, (1, 16))
    for step in range(3):  # the trace is recorded in step 1; prefetching starts with step 2
        state["on"] = step >= 1
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    persistent = sum(p.ds_numel for p in state["params"] if p.ds_persist)
    out.append({**case, "peak": state["peak"], "persistent": persistent})
    engine.destroy()
print("RESULT" + json.dumps(out))
