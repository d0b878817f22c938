"""Nash-MP's snapshots under DeepSpeed ZeRO-3 on two processes (tests/test_distributed.py launches it):

    accelerate launch --config_file configs/accelerate/cpu_zero3.yaml tests/scripts/zero3_snapshot_job.py OUT_DIR

A tiny Llama under ZeRO-3 (persistence threshold 640, the shipped config's "auto" for hidden 64: the norms
stay gathered between steps, every other weight is partitioned), one training step, then: a snapshot
(`take_snapshot`) holds this process's partition of each parameter; `swapped` puts it in and takes it out
bit for bit (compared on gathered full values and on logits); a full-valued snapshot (`full_snapshot`, as
GSHF's enhancer writes to disk) loads by slices; training continues after the swaps. The collectives that
the snapshot calls make (outside forward passes) are counted: none are expected (a gather counts some). Each process writes
OUT_DIR/rank<r>.json.
"""

import json
import math
import sys
from pathlib import Path

import torch

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "allgather_fn", "all_gather_coalesced", "broadcast",
               "all_reduce", "reduce_scatter_fn", "reduce_scatter_tensor")


def main() -> None:
    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import LlamaConfig, LlamaForCausalLM

    from klalign.models.snapshots import (
        PartitionedSnapshot,
        full_snapshot,
        load_snapshot,
        swapped,
        take_snapshot,
    )

    out = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 640},
                 "zero_force_ds_cpu_optimizer": False}
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))

    def step():
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    @torch.no_grad()
    def logits():
        return engine(input_ids=ids).logits.clone()

    calls = {"n": 0}
    originals = {name: getattr(ds_comm, name) for name in COLLECTIVES if hasattr(ds_comm, name)}

    def counted(name):
        def call(*args, **kwargs):
            calls["n"] += 1
            return originals[name](*args, **kwargs)
        return call

    def without_collectives(fn, *args):
        """Run fn and return (its result, the number of collectives it called)."""
        before = calls["n"]
        for name in originals:
            setattr(ds_comm, name, counted(name))
        try:
            result = fn(*args)
        finally:
            for name, original in originals.items():
                setattr(ds_comm, name, original)
        return result, calls["n"] - before

    step()
    full0, logits0 = full_snapshot(model), logits()
    snap0, taken = without_collectives(take_snapshot, model)
    params = dict(model.named_parameters())
    sizes = {name: [t.numel(), math.ceil(params[name].ds_numel / world), params[name].ds_numel]
             for name, t in snap0.items()}
    slices = all(  # process r holds elements [r * n, r * n + n) of the flattened parameter
        torch.equal(t[: max(0, min(t.numel(), full0[name].numel() - rank * t.numel()))],
                    full0[name].reshape(-1)[rank * t.numel(): rank * t.numel() + t.numel()])
        for name, t in snap0.items())
    step()
    full1, logits1 = full_snapshot(model), logits()
    persistent = [name for name, p in params.items() if p.ds_persist]
    gathered_at_swap = [name for name, p in params.items() if p.ds_status == ZeroParamStatus.AVAILABLE]
    with swapped(model, snap0):
        inside, inside_logits = full_snapshot(model), logits()
    after, after_logits = full_snapshot(model), logits()
    _, swaps = without_collectives(lambda: [load_snapshot(model, s) for s in (snap0, take_snapshot(model))])
    snap1 = take_snapshot(model)
    _, full_load = without_collectives(load_snapshot, model, full0)  # full values: each process its slice
    loaded, loaded_logits = full_snapshot(model), logits()
    load_snapshot(model, snap1)
    restored = full_snapshot(model)
    step()  # training continues from the restored weights
    trained, gathers = without_collectives(full_snapshot, model)  # the counter sees a gather
    equal = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    result = {
        "world": world, "partitioned": isinstance(snap0, PartitionedSnapshot), "sizes": sizes,
        "persistent": persistent, "gathered_at_swap": gathered_at_swap,
        "snapshot_numel": sum(t.numel() for t in snap0.values()), "model_numel": sum(p.ds_numel for p in params.values()),
        "slices_match": slices, "steps_differ": not equal(full0, full1),
        "inside_is_snapshot": equal(inside, full0), "inside_logits": torch.equal(inside_logits, logits0),
        "restored_after_swap": equal(after, full1), "after_logits": torch.equal(after_logits, logits1),
        "full_load": equal(loaded, full0), "full_load_logits": torch.equal(loaded_logits, logits0),
        "restored_after_full_load": equal(restored, full1), "trained_after": not equal(trained, full1),
        "collectives": {"take_snapshot": taken, "swap_in_and_out": swaps, "full_load": full_load,
                        "full_snapshot": gathers},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from klalign.models.placement import run_launched

    # As in the recipes: the gloo group is closed before interpreter shutdown, whose arbitrary order of
    # destruction aborted rank 1 once ("terminate called without an active exception") after both ranks wrote.
    run_launched(main)
