"""Divergence, noticed: a non-finite loss, gradient norm or KL stops an online run with one line naming the
round and the step, before anything non-finite is checkpointed; a KL to the reference above
`kl_warning_threshold` warns once per round. Every process takes the same decision (a non-finite value on
one process is shared), so no process waits at a collective for another that stopped."""

from __future__ import annotations

import math

import torch
from transformers.utils import logging

from klalign.errors import DivergenceError

logger = logging.get_logger(__name__)


def stop_if_not_finite(accelerator, where: str, **values) -> None:
    """Raise `DivergenceError` naming `where` and each non-finite value, on every process alike."""
    names = list(values)
    local = torch.tensor([float(not math.isfinite(float(values[name]))) for name in names],
                         device=accelerator.device)
    bad = accelerator.reduce(local, "sum") if accelerator.num_processes > 1 else local
    if bad.any():
        found = ", ".join(f"{name} {float(values[name]):.4g}" for name, b in zip(names, bad.tolist()) if b)
        raise DivergenceError(f"training diverged at {where}: {found} (lower the learning rate, or clip gradients "
                              "with max_grad_norm); no checkpoint was written for this round")


def warn_if_far(metrics: dict, round_index: int, threshold: float | None) -> None:
    """One warning when the round's KL estimate to the reference exceeds `threshold` nats."""
    kl = metrics.get("kl_k3", metrics.get("kl_k1"))
    if threshold is not None and kl is not None and kl > threshold:
        logger.warning(f"round {round_index}: KL(pi || pi_ref) is {kl:.3g} nats, above kl_warning_threshold "
                       f"{threshold:g}: the policy is far from the reference (beta too small or the learning rate "
                       "too large?)")
