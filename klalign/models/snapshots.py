"""Snapshots of the trainable parameters: theta_k of Nash-MP, the previous iterate of GSHF's enhancer;
and of the optimizer's state (EGPO restores the state it had at theta_k for its full step).

A snapshot is a copy of the trainable parameters (the LoRA adapter with PEFT, every weight
otherwise), taken and restored on every process. Under DeepSpeed ZeRO-3 each process keeps only its
own partition of every parameter (a `PartitionedSnapshot`: 1/world of the memory of a full copy), the
slice DeepSpeed itself keeps in `param.ds_tensor`, and restoring writes each process's slice back into
its own partition: no gather, no collective. A parameter that is gathered at that moment (a persistent
one, kept whole between steps, or one DeepSpeed left gathered after a forward pass) is released, so the
next forward gathers it from the written partitions. Without ZeRO-3 a snapshot holds full values.
`full_snapshot` gathers full values (a collective) for a caller that needs them: a snapshot written to
disk, compared or logged across processes, or handed to another engine.

Two kinds of restore, for two uses:

- `swapped(model, state)` puts another iterate's weights into the model for a few forward passes
  (sampling the opponent, reading pi_k's log-probs) and then puts the current ones back bit for bit:
  only the weights the model computes with are touched.
- `reset(model, state, engine)` makes a snapshot the starting point of further training (Nash-MP's
  full step restarts from theta_k). A DeepSpeed ZeRO optimizer keeps its own fp32 copy of the weights
  (the masters, also in fp32 training) and steps from it, so the snapshot holds the masters
  (`deepspeed.utils.safe_get_full_fp32_param`; under ZeRO-3 each process its own partition) and the
  reset writes them back as well as the weights. Restoring only the 16-bit weights and refreshing the
  masters from them would round theta_k to bf16 at every iteration and erase every update smaller than
  half a bf16 ulp (lr 5e-6 updates on weights of size ~1e-2 are), so training would stall.

Under ZeRO-3 a snapshot may also be full-valued (`full_snapshot`, or a file of full values, GSHF's
previous iterate): then each process writes its own slice of it, again without a collective.
"""

from __future__ import annotations

import contextlib

import torch

from klalign.models.placement import gathered


class PartitionedSnapshot(dict):
    """name -> this process's ZeRO-3 partition of the parameter: a flat copy of its `ds_tensor`,
    ceil(numel / world) elements (the last process's padded). Only the process that took it can load it;
    `full_snapshot` gives full values."""


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _zero3(params) -> bool:
    return any(hasattr(p, "ds_id") for _, p in params)


def master_weights(engine) -> bool:
    """True when `engine` is a DeepSpeed engine whose optimizer keeps its own fp32 copy of the weights
    (ZeRO stages 1-3 always, in fp32 too; stage 0 under bf16/fp16): training continues from that copy,
    not from the weights the model computes with, so a reset must write it."""
    if engine is None or not hasattr(engine, "zero_optimization_stage") or getattr(engine, "optimizer", None) is None:
        return False
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def _refresh_masters_from_weights(engine) -> None:
    """DeepSpeed stage 0 under bf16/fp16 keeps its masters where no public API reaches them one by one:
    copy the (16-bit) weights into them, as that optimizer's own `refresh_fp32_params` does. Sub-ulp
    differences are then lost; ZeRO stages 1-3 keep them (see the module docstring)."""
    optimizer = engine.optimizer
    while optimizer is not None and not hasattr(optimizer, "refresh_fp32_params"):
        optimizer = getattr(optimizer, "optimizer", None)
    if optimizer is not None:
        optimizer.refresh_fp32_params()


def _local_partitions(params) -> bool:
    """True when the parameters are ZeRO-3-partitioned and each process can read and write its own
    partition in place: DeepSpeed's `ds_tensor` (private: klalign.internals), in memory (not swapped out
    to NVMe) and the only copy (ZeRO++'s hierarchical partitioning keeps a second one, `ds_secondary_tensor`,
    that forward passes gather from; that case falls back to gathering full values)."""
    if not _zero3(params):
        return False
    for _, p in params:
        partition = getattr(p, "ds_tensor", None)  # private: klalign.internals
        if partition is None or getattr(p, "ds_secondary_tensor", None) is not None:
            return False
        if getattr(partition, "final_location", None) == "nvme":  # DeepSpeed's OffloadDeviceEnum is a str enum
            return False
    return True


def take_snapshot(model, engine=None) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters; with fp32 masters (see `master_weights`) their fp32 values.

    Under ZeRO-3 each process keeps only its own partition (a `PartitionedSnapshot`, 1/world of the
    memory, no collective); otherwise the full values. Every process must take it (a collective in the
    fallback that gathers).
    """
    params = _trainable(model)
    if master_weights(engine) and engine.zero_optimization_stage() > 0:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

        if _zero3(params):
            return PartitionedSnapshot({name: safe_get_local_fp32_param(p).detach().clone() for name, p in params})
        return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in params}  # a collective
    if _local_partitions(params):
        # private: klalign.internals (ds_tensor: this process's partition)
        return PartitionedSnapshot({name: p.ds_tensor.detach().clone() for name, p in params})
    return full_snapshot(model)


def full_snapshot(model) -> dict[str, torch.Tensor]:
    """Full values of the trainable parameters on every process (the weights the model computes with).
    Under ZeRO-3 a gather: a collective, every process must call it, and every process holds a full copy.
    For a snapshot that leaves the process: written to disk, compared or logged across processes."""
    params = _trainable(model)
    with gathered([p for _, p in params]):
        return {name: p.detach().clone() for name, p in params}


def _write_partitions(params, state: dict[str, torch.Tensor]) -> None:
    """Write `state` into each process's own ZeRO-3 partitions (`ds_tensor`, private: klalign.internals),
    cast to their dtype, without a collective: a `PartitionedSnapshot` as it is, full values by this
    process's slice. DeepSpeed lays a parameter out flat, process r holding elements [r * n, (r + 1) * n)
    with n = ds_tensor's length (`Init._partition_param`). A parameter gathered now (a persistent one, or
    one DeepSpeed left gathered after a forward pass) is then released, as `GatheredParameters` releases
    on exit without a modifier: its gathered copy would be stale, and the next forward gathers the
    written partitions."""
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitioned = isinstance(state, PartitionedSnapshot)
    written = [(name, p) for name, p in params if name in state]
    with torch.no_grad():
        for name, p in written:
            partition = p.ds_tensor  # private: klalign.internals
            value = state[name].to(device=partition.device)
            if partitioned:
                partition.copy_(value)
                continue
            start = dist.get_rank(group=p.ds_process_group) * partition.numel()  # private: klalign.internals
            count = min(partition.numel(), p.ds_numel - start)  # the last partition is padded
            if count > 0:
                partition.narrow(0, 0, count).copy_(value.reshape(-1).narrow(0, start, count))
    for name, p in written:
        if p.ds_status == ZeroParamStatus.AVAILABLE:  # private: klalign.internals
            if p.ds_active_sub_modules:
                raise RuntimeError(f"cannot load a snapshot into {name}: a module is computing with it "
                                   "(load snapshots between forward passes, not inside one)")
            p.partition(has_been_updated=False)  # private: klalign.internals (frees the stale gathered copy)
        elif p.ds_status != ZeroParamStatus.NOT_AVAILABLE:
            raise RuntimeError(f"cannot load a snapshot into {name} while it is being gathered ({p.ds_status})")


def _write_weights(params, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (full values, or under ZeRO-3 this process's partitions) into the weights the model
    computes with, cast to their dtype."""
    if _local_partitions(params):
        _write_partitions(params, state)
        return
    if isinstance(state, PartitionedSnapshot):
        raise ValueError("a partitioned (ZeRO-3) snapshot can only be loaded into the partitions it was taken from")
    with gathered([p for _, p in params], modify=True), torch.no_grad():
        for name, p in params:
            if name in state:
                p.copy_(state[name])


def load_snapshot(model, state: dict[str, torch.Tensor]) -> None:
    """Write a snapshot into the weights the model computes with: full values (every process the same), or
    this process's partitions (from `take_snapshot` on this process under ZeRO-3)."""
    _write_weights(_trainable(model), state)


def reset(model, state: dict[str, torch.Tensor], engine=None) -> None:
    """Make `state` (from `take_snapshot(model, engine)`) the parameters training continues from:
    the fp32 masters when the optimizer keeps them, and the 16-bit weights cast from them."""
    params = _trainable(model)
    if not master_weights(engine):
        _write_weights(params, state)
        return
    if engine.zero_optimization_stage() == 0:
        _write_weights(params, state)
        _refresh_masters_from_weights(engine)
        return
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    if _zero3(params):
        for name, p in params:
            safe_set_local_fp32_param(p, state[name])
        if _local_partitions(params):  # the 16-bit partitions follow their masters' partitions, locally
            _write_partitions(params, PartitionedSnapshot(state))
            return
        # The 16-bit partitions follow their masters: gather the restored masters and write them.
        full = {name: safe_get_full_fp32_param(p) for name, p in params}
    else:
        for name, p in params:
            safe_set_full_fp32_param(p, state[name])
        full = state
    _write_weights(params, full)


@contextlib.contextmanager
def swapped(model, state: dict[str, torch.Tensor] | None):
    """Run the block with `state` in the model's weights (None: the current ones), then restore them exactly.

    `state`: a snapshot taken without `engine` (under ZeRO-3 this process's partitions), or full values.
    Under ZeRO-3 neither the swap nor the restore is a collective."""
    if state is None:
        yield
        return
    current = take_snapshot(model)
    load_snapshot(model, state)
    try:
        yield
    finally:
        load_snapshot(model, current)


def inner_optimizer(optimizer):
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (its `state` is keyed by parameter;
    DeepSpeed's `.optimizer` is private: klalign.internals)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def clear_optimizer_state(optimizer) -> None:
    """Forget the moments and step counts: the next step starts a new problem (a prox step from theta_k)."""
    optimizer = inner_optimizer(optimizer)
    optimizer.state.clear()  # torch optimizers (and DeepSpeed's) rebuild the state on their next step
    for group in optimizer.param_groups:
        if "step" in group:  # fused Adams count steps per group
            group["step"] = 0


def optimizer_state(optimizer) -> tuple[dict, list]:
    """A copy of the optimizer's state (tensors cloned) and of its per-group step counts."""
    optimizer = inner_optimizer(optimizer)
    copy = lambda v: v.clone() if torch.is_tensor(v) else v  # noqa: E731
    return ({p: {k: copy(v) for k, v in state.items()} for p, state in optimizer.state.items()},
            [group.get("step") for group in optimizer.param_groups])


def restore_optimizer_state(optimizer, saved: tuple[dict, list]) -> None:
    """Put back a state from `optimizer_state` (copied again, so it can be restored twice)."""
    optimizer = inner_optimizer(optimizer)
    state, steps = saved
    optimizer.state.clear()
    for p, values in state.items():
        optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in values.items()}
    for group, step in zip(optimizer.param_groups, steps):
        if step is not None:
            group["step"] = step
