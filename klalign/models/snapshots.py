"""Snapshots of the trainable parameters: theta_k of Nash-MP, the previous iterate of GSHF's enhancer;
and of the optimizer's state (EGPO restores the state it had at theta_k for its full step).

A snapshot is a copy of the trainable parameters (the LoRA adapter with PEFT, every weight
otherwise), taken and restored on every process (under ZeRO-3 the copy gathers the shards: a
collective, so no process may skip it).

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
"""

from __future__ import annotations

import contextlib

import torch

from klalign.models.placement import gathered


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


def take_snapshot(model, engine=None) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters; with fp32 masters (see `master_weights`) their fp32 values.

    Under ZeRO-3 with masters each process keeps only its own partition of the masters (1/world of
    the memory); otherwise the full values.
    """
    params = _trainable(model)
    if master_weights(engine) and engine.zero_optimization_stage() > 0:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

        if _zero3(params):
            return {name: safe_get_local_fp32_param(p).detach().clone() for name, p in params}
        return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in params}  # a collective
    with gathered([p for _, p in params]):
        return {name: p.detach().clone() for name, p in params}


def _write_weights(params, state: dict[str, torch.Tensor]) -> None:
    """Copy full `state` values into the (gathered) weights the model computes with, cast to their dtype."""
    with gathered([p for _, p in params], modify=True), torch.no_grad():
        for name, p in params:
            if name in state:
                p.copy_(state[name])


def load_snapshot(model, state: dict[str, torch.Tensor]) -> None:
    """Write a full-value snapshot into the weights the model computes with (every process the same values)."""
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

    `state` holds full values: a snapshot taken without `engine`."""
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
