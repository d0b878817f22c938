"""Exact metrics of a policy on the single-token test bed, and a callback that records them.

The test bed's policy is read from the logits (`klalign.testbed.model.read_policy`), so every quantity
of ALGORITHMS.md is exact here: regret `J(pi*) - J(pi) = beta KL(pi || pi*)` (section 0) against
the tilted optimum of the reward, and exploitability and KL to the regularised Nash equilibrium
of the preference matrix (section 3). Trainers stay unaware: the callback rides on HF's
`TrainerCallback.on_log`, i.e. after every round of an online trainer.
"""

from __future__ import annotations

import numpy as np
from transformers import TrainerCallback

from klalign.testbed.bandit import SingleTokenBandit
from klalign.testbed.model import read_policy
from klalign.theory import exploitability, kl, regularized_nash, regularized_objective


def exact_metrics(policy: np.ndarray, bandit: SingleTokenBandit, beta: float) -> dict[str, float]:
    """Means over prompts. `policy` (C, K) is renormalised over the actions (off-action mass ~1e-9)."""
    pi = policy / policy.sum(-1, keepdims=True)
    ref = bandit.ref.numpy()
    out = {"testbed/kl_to_ref": float(kl(pi, ref).mean()), "testbed/off_action_mass": float(1 - policy.sum(-1).mean())}
    if bandit.reward is not None:
        reward = bandit.reward_table().numpy()
        star = bandit.optimal_policy(beta).numpy()
        out["testbed/kl_to_optimum"] = float(kl(pi, star).mean())  # KL(pi || pi*)
        out["testbed/regret"] = float((regularized_objective(star, ref, reward, beta)
                                       - regularized_objective(pi, ref, reward, beta)).mean())
        out["testbed/reward"] = float((pi * reward).sum(-1).mean())
    if bandit.P is not None:
        P = bandit.preference_matrix().numpy()
        nash = np.stack([regularized_nash(P[c], ref[c], beta) for c in range(len(ref))])  # (C, K)
        out["testbed/exploitability"] = float(np.mean([exploitability(P[c], ref[c], beta, pi[c]) for c in range(len(ref))]))
        out["testbed/kl_nash_to_policy"] = float(kl(nash, pi).mean())  # KL(pi* || pi), Nash-MP's rate
    return out


class TestbedMetricsCallback(TrainerCallback):
    """After every logged round, read the policy and append its exact metrics to `self.history`."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, bandit: SingleTokenBandit, beta: float):
        self.bandit, self.beta = bandit, beta
        self.history: list[dict[str, float]] = []

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None or "round" not in (logs or {}):
            return
        policy = read_policy(model, self.bandit).numpy()
        self.history.append({"round": logs["round"], "step": state.global_step, **exact_metrics(policy, self.bandit, self.beta)})
