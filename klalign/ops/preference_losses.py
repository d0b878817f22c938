"""Preference losses, one function each, selected by name through `PREFERENCE_LOSSES`.

Every loss takes the chosen and rejected log-ratios `log pi(y) - log pi_ref(y)` (sequence level,
(B,) each), the completion lengths (B,) and `beta`, and returns the per-pair loss (B,).
With `delta = chosen_logratio - rejected_logratio` (ALGORITHMS.md section 2):
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def dpo_sigmoid_loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * delta).

    Also RSO's "sigmoid-norm" loss as the RSO paper defines it (Liu et al. 2024, eq. 7: the
    likelihoods are normalised by the SFT/reference policy, which is exactly the DPO form).
    """
    return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))


def rso_hinge_loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta):
    """RSO hinge (Liu et al. 2024, eq. 8; SLiC-HF form): relu(1 - beta * delta), beta the inverse margin."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def length_normalized_sigmoid_loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta):
    """TRL's `sigmoid_norm`: DPO on per-token log-ratios, -log sigmoid(beta * (l_w/|y_w| - l_l/|y_l|)).

    Kept under TRL's name so a TRL pipeline that selects it gets the same loss here.
    """
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return -F.logsigmoid(beta * delta)


def ipo_loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta):
    """IPO (Azar et al. 2024, eq. 17) on per-token log-ratios, as TRL and the IPO authors use it:
    (l_w/|y_w| - l_l/|y_l| - 1/(2 beta))^2, beta the regulariser tau."""
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


PREFERENCE_LOSSES: dict[str, Loss] = {
    "sigmoid": dpo_sigmoid_loss,
    "hinge": rso_hinge_loss,
    "sigmoid_norm": length_normalized_sigmoid_loss,
    "ipo": ipo_loss,
}


def bradley_terry_probability(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """P(chosen > rejected) = sigmoid(r_c - r_r): the Bradley-Terry preference of a reward (ALGORITHMS.md
    section 2) under which DPO with coefficient beta fits the tilt pi_ref exp(r / beta), the maximiser of
    J = E r - beta KL. (B,)"""
    return torch.sigmoid(chosen_rewards - rejected_rewards)


def expected_label_loss(loss: Loss, chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths,
                        beta: float, prob: torch.Tensor) -> torch.Tensor:
    """`loss` averaged over the pair's Bradley-Terry label: p loss(c, r) + (1 - p) loss(r, c), p = P(c > r).

    For DPO's sigmoid loss this is the cross-entropy against the soft label p, the population loss of
    labels drawn from P (Rafailov et al. 2023, eq. 7 in expectation): the same minimiser, the tilt, with no
    label noise. A deterministic label (the higher reward always wins) is the BT preference of an infinitely
    scaled reward: its minimiser drives every margin to infinity, which is why DPO on ranked pairs overshoots
    the KL. (B,)"""
    forward = loss(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths, beta)
    backward = loss(rejected_logratios, chosen_logratios, rejected_lengths, chosen_lengths, beta)
    return prob * forward + (1 - prob) * backward


def get_preference_loss(name: str) -> Loss:
    """The loss function for `loss_type`, or a clear error listing the choices."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type {name!r} is not supported; choose one of {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name]
