"""`hf_weights` (the vLLM push) of a LoRA policy under DeepSpeed ZeRO-3, 2 CPU processes over gloo: every
parameter partitioned, the pushed names and values equal those of the whole model before partitioning,
and the training weights unchanged after three pushes (tests/test_distributed.py runs it).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/zero3_push.py
"""

import os

import deepspeed
import torch
from peft import LoraConfig, get_peft_model

from klalign.generation.vllm_engine import hf_weights
from klalign.models.placement import gathered, run_launched
from klalign.models.tiny import build_causal_lm, build_tokenizer


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    model = get_peft_model(build_causal_lm(build_tokenizer()), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"]))
    generator = torch.Generator().manual_seed(1)  # the same B on both processes
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    expected = {name: t.clone() for name, t in hf_weights(model)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=0.0), config=config)
    params = list(engine.module.named_parameters())
    assert all(p.numel() == 0 and hasattr(p, "ds_id") for _, p in params), "not every parameter is partitioned"
    for _ in range(3):
        pushed = {name: t.clone() for name, t in hf_weights(engine)}  # cloned while gathered, as vLLM copies
    assert list(pushed) == list(expected), (list(pushed)[:5], list(expected)[:5])
    differ = [name for name in pushed if not torch.equal(pushed[name], expected[name])]
    assert not differ, differ
    with gathered([p for _, p in params]):
        changed = [name for name, p in params if not torch.equal(p.data, before[name])]
    assert not changed, changed
    print(f"rank {rank}: {len(pushed)} pushed tensors equal the whole model's; training weights unchanged", flush=True)


if __name__ == "__main__":  # the group closed before interpreter shutdown, as in the recipes
    run_launched(main)
