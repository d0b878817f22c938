"""Optimistic KL-regularised online RLHF (Zhao, Ye, Xiong, Gu, Zhang 2025, paper 000; ALGORITHMS.md section 1).

Paper 000's KL-regularised UCB (ICML 2025, arXiv 2502.07460, Algorithm 1; eta = 1/beta there), round t:
  1. fit `r_hat` on all feedback so far (least squares, or the preference MLE);
  2. an uncertainty bonus `b_t` (`gamma * ||phi||_{Sigma_t^-1}` for a linear class);
  3. the optimistic reward `r_tilde = min(r_max, r_hat + b_t)`;
  4. play the Gibbs policy `pi_t ∝ pi_ref * exp(r_tilde / beta)`, observe feedback.
Its regret `sum_t J(pi*) - J(pi_t)` is O(eta * d * log(N T)). An LLM's Gibbs policy cannot be
sampled, so here the policy network is trained toward it (ALGORITHMS.md section 1, last paragraph).

One round of `OptimisticKLTrainer`:

  collect  k samples per prompt from the current policy; a `RewardOracle` scores each one, a
           `PreferenceOracle` compares neighbours (i vs i+1 mod k: k queries, every sample in two
           comparisons; one query when k = 2), labels drawn from its probabilities. Stored with the
           samples' log-probs under the policy and the reference.
  update   refit the reward learner (`klalign.trainers.reward_learning`) on every stored round, score this
           round's samples with `r_tilde` (steps 1-3; with comparisons the bonus is taken on the difference
           from the mean feature of the prompt's samples: `optimistic_rewards`), then policy-gradient steps on
               J_tilde(pi) = E_{y ~ pi} r_tilde(x, y) - beta * KL(pi || pi_ref),
           whose maximiser is exactly step 4's Gibbs policy (ALGORITHMS.md section 0).
           `update_reward: observed` puts the oracle's reward of each of these samples in place of their
           r_hat (r_tilde = min(r_max, r + b_t), the bonus still the learner's): they were scored, and r_hat
           carries the learner's misspecification into every step (on SmolLM2 the MiniLM ridge fit explains about
           a third of VADER's within-prompt variance on fresh replies: docs/captured_gain.md). The price is r_hat's
           averaging of a noisy oracle's noise; `fitted` (the default) is the paper's algorithm.

The gradient is REINFORCE with the leave-one-out baseline over a prompt's k samples (RLOO; Kool et
al. 2019, Ahmadian et al. 2024): `A_i = R_i - mean_{j != i} R_j = k/(k-1) (R_i - mean_j R_j)`, at
the sequence level (`s(y)` = summed token log-probs). Where the KL enters (`kl_penalty`):

- `k1_in_reward` (default): `R_i = r_tilde_i - beta * (s(y_i) - s_ref(y_i))`, detached. Since
  `grad KL(pi || pi_ref) = E_pi[(log pi - log pi_ref) grad log pi]`, this is an unbiased
  gradient of J_tilde: its fixed point is the Gibbs policy of step 4.
- `k3_in_loss` (the GRPO form): `R_i = r_tilde_i` and `beta * mean k3(s - s_ref)` added to the
  loss. On-policy, `E_pi grad k3 = grad KL(pi_ref || pi)`, the forward KL, so its fixed point is
  close to, not exactly, the Gibbs policy; offered for comparison with GRPO-style pipelines.

What optimism can and cannot do here: an LLM's r_tilde is only evaluated on sampled responses, so
a response the policy never samples gets no gradient and its probability is not raised the way
the exact Gibbs policy of step 4 would raise it. The bonus acts once a response has been sampled
(its shrunk fitted reward is lifted toward r_max, so the policy moves to it before greedy would)
and keeps rarely sampled responses alive. `bench/optimistic_regret.py` measures the effect against
the exact regime.

The first optimizer step of a round is the exact on-policy gradient (ratio pi / pi_old = 1); later
steps on the same samples (more mini-batches or `epochs_per_round` > 1) use PPO's clipped ratio.

Everything the learner sees is rebuilt from the feedback store (features are computed per round,
cached in memory, recomputed from the stored text on resume; ensemble bootstrap weights are seeded
by round), so a resumed run refits the same reward and continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klalign.data.prompts import restored_prompt, stored_prompt
from klalign.ops.importance import (
    at_scored_positions,
    importance_weights,
    mismatch_metrics,
    sample_statistics,
    weighted_kl,
)
from klalign.ops.kl import kl_k3
from klalign.ops.logprobs import token_logprobs
from klalign.oracles.base import BradleyTerryPreference, PreferenceOracle, RewardOracle
from klalign.runs.seeding import derived_seed
from klalign.trainers.features import FeatureMap
from klalign.trainers.online import OnlineTrainer
from klalign.trainers.optimistic_config import OptimisticKLConfig
from klalign.trainers.reward_learning import (
    RewardLearner,
    build_reward_learner,
    group_baselines,
)


@dataclass
class RoundFeedback:
    """What the reward learner needs from one stored round (G prompts, k samples each)."""

    phi: torch.Tensor  # (G, k, d) features of every sample
    rewards: torch.Tensor | None  # (G, k) oracle rewards (reward feedback)
    pairs: torch.Tensor | None  # (P, 3) long: group, sample a, sample b (preference feedback)
    a_wins: torch.Tensor | None  # (P,) 1.0 if a was preferred
    weights: torch.Tensor | None  # (N, H) bootstrap weights per data point (ensemble learner)

    def data(self) -> tuple[torch.Tensor, ...]:
        """(phi, rewards) or (phi_a, phi_b, a_wins): the learner's inputs from this round."""
        if self.rewards is not None:
            return self.phi.flatten(0, 1), self.rewards.flatten()
        g, a, b = self.pairs.unbind(1)
        return self.phi[g, a], self.phi[g, b], self.a_wins


def optimistic_rewards(learner: RewardLearner, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """r_hat, the bonus b_t and r_tilde = min(r_max, r_hat + b_t) of every sample (paper 000, Algorithm 1, steps
    1-3), from the samples' features phi (G, k, d). (G, k) each.

    Reward feedback: b_t = gamma ||phi(x, y)||_{Sigma_t^-1}, Sigma_t from the absolute features (paper 000).
    Preference feedback: Sigma_t is built from differences phi_a - phi_b, and so is the bonus,
    b_t(x, y) = gamma ||phi(x, y) - phi_bar_t(x)||_{Sigma_t^-1} with phi_bar_t(x) the mean feature of the
    prompt's k samples of pi_t (`group_baselines`; the equation and why: `RewardLearner.bonus`). Taken on
    absolute features, a direction shared by every response (never in any difference) kept the bonus at
    its prior there, about the same for the whole group, and with r_max it clipped whole groups to r_max:
    zero leave-one-out advantages, no learning signal.
    """
    G, k, _ = phi.shape
    flat = phi.flatten(0, 1)  # (G * k, d)
    baseline = group_baselines(phi) if learner.feedback == "preference" else None
    r_hat, bonus, r_tilde = learner.predict(flat), learner.bonus(flat, baseline), learner.optimistic(flat, baseline)
    return r_hat.view(G, k), bonus.view(G, k), r_tilde.view(G, k)


class OptimisticKLTrainer(OnlineTrainer):
    """Optimistic KL-regularised online RLHF (see the module docstring).

    `feature_map` is a frozen `phi(prompts, responses) -> (N, d)` (`klalign.trainers.reward_learning`).
    """

    oracle_kind = (RewardOracle, PreferenceOracle)

    def __init__(self, model, ref_model=None, args: OptimisticKLConfig | None = None, train_dataset=None,
                 processing_class=None, oracle=None, feature_map: FeatureMap | None = None, peft_config=None,
                 callbacks=None):
        if not isinstance(args, OptimisticKLConfig):
            raise TypeError(f"args must be an OptimisticKLConfig, got {type(args).__name__}")
        if not callable(feature_map) or not isinstance(getattr(feature_map, "dim", None), int):
            raise TypeError("feature_map must be a FeatureMap: phi(prompts, responses) -> (N, dim), with .dim")
        if args.update_reward == "observed" and not isinstance(oracle, RewardOracle):
            raise ValueError(f"update_reward 'observed' takes each sample's reward from a RewardOracle; the oracle is a "
                             f"{type(oracle).__name__}: use update_reward 'fitted' with preference feedback")
        super().__init__(model, ref_model, args, train_dataset, processing_class, oracle, peft_config, callbacks)
        self.feature_map = feature_map.prepare(self.accelerator)
        self.feedback: dict[int, RoundFeedback] = {}  # per-round learner inputs, rebuilt from the store

    def steps_per_round(self) -> int:
        prompts = -(-self.args.prompts_per_round // self.args.world_size)
        batches = -(-prompts * self.args.samples_per_prompt // self.args.per_device_train_batch_size)
        return self.args.epochs_per_round * batches

    # ---- collect: k samples per prompt, the oracle's feedback, log-probs for the update ----

    def collect(self, round_index: int, prompts: list) -> list[dict]:
        k = self.args.samples_per_prompt
        samples = self.generate(prompts, k)  # one list of k Completions per prompt
        rows = [{"prompt": stored_prompt(p), "prompt_ids": group[0].prompt_ids,
                 "completion_ids": [c.completion_ids for c in group], "responses": [c.text for c in group]}
                for p, group in zip(prompts, samples)]
        if isinstance(self.oracle, RewardOracle):
            self._ask_rewards(prompts, rows)
        else:
            self._ask_preferences(prompts, rows)
        for row, stats in zip(rows, self._sample_logprobs(rows, [c for group in samples for c in group])):
            row.update(stats)
        return rows

    def _ask_rewards(self, prompts: list, rows: list[dict]) -> None:
        k = self.args.samples_per_prompt
        flat_prompts = [p for p in prompts for _ in range(k)]
        rewards = self.oracle.score(flat_prompts, [r for row in rows for r in row["responses"]]).view(-1, k)
        for row, r in zip(rows, rewards.tolist()):
            row.update(rewards=r, pairs=None, preference_probs=None, a_wins=None, oracle_queries=k)

    def _ask_preferences(self, prompts: list, rows: list[dict]) -> None:
        k = self.args.samples_per_prompt
        pairs = [(0, 1)] if k == 2 else [(i, (i + 1) % k) for i in range(k)]
        flat_prompts = [p for p in prompts for _ in pairs]
        a = [row["responses"][i] for row in rows for i, _ in pairs]
        b = [row["responses"][j] for row in rows for _, j in pairs]
        probs = self.oracle.preference(flat_prompts, a, b).view(len(rows), len(pairs))  # (G, P)
        wins = torch.bernoulli(probs)  # seeded by the online loop per (round, chunk)
        for row, p, w in zip(rows, probs.tolist(), wins.tolist()):
            row.update(rewards=None, pairs=[list(pair) for pair in pairs], preference_probs=p, a_wins=w,
                       oracle_queries=len(pairs))

    @torch.no_grad()
    def _sample_logprobs(self, rows: list[dict], completions: list) -> list[dict]:
        """Per prompt, for each of its k samples: s(y) under the policy (pi_old of the update) and the reference,
        pi_old's per-token log-probs (token-level PPO ratios), the sampler's per-token log-probs, the KL
        estimates (importance-weighted toward pi_old), and the mismatch (`klalign.ops.importance`)."""
        k, args = self.args.samples_per_prompt, self.args
        size = args.per_device_train_batch_size // k  # prompts per batch
        out = []
        for start in range(0, len(rows), size):
            group = completions[start * k : (start + size) * k]
            batch = self._sample_batch(rows[start : start + size])
            mask = batch["completion_mask"][:, 1:]  # (B * k, T-1)
            token_logps = self.policy_token_logprobs(batch, group)  # (B * k, T-1): the sampler's, where it is pi_old
            token_ref = self.reference.token_logprobs(self.model_wrapped, batch)  # (B * k, T-1)
            other = [c.importance_logprobs for c in group]  # None where pi_old itself drew them
            sampler = at_scored_positions(other, batch["completion_mask"])
            weights = importance_weights(token_logps, sampler, mask, args.importance_correction, args.importance_cap)
            k1, k3 = weighted_kl(token_logps - token_ref, mask, weights)  # (B * k,) each
            sampled = sample_statistics(token_logps, batch["completion_mask"], other, args.importance_cap)
            scored = [row[m.bool()].tolist() for row, m in zip(token_logps.double().cpu(), mask.cpu())]
            per_sample = list(zip(token_logps.sum(1).tolist(), token_ref.sum(1).tolist(), scored, k1.tolist(),
                                  k3.tolist(), sampled, other))
            for g in range(len(per_sample) // k):
                mine = per_sample[g * k : (g + 1) * k]
                stats = [s for *_, s, _ in mine]
                out.append({
                    "logprobs": [x[0] for x in mine], "ref_logprobs": [x[1] for x in mine],
                    "token_logprobs": [x[2] for x in mine], "kl_k1": [x[3] for x in mine], "kl_k3": [x[4] for x in mine],
                    "sampler_token_logprobs": None if mine[0][6] is None else [x[6] for x in mine],
                    "sampler_logprobs": None if stats[0]["sampler_logprob"] is None else [s["sampler_logprob"] for s in stats],
                    "train_logprob": sum(s["train_logprob"] or 0.0 for s in stats),
                    "sampler_logprob": None if stats[0]["sampler_logprob"] is None else sum(s["sampler_logprob"] for s in stats),
                    "mismatch_sum": None if stats[0]["mismatch_sum"] is None else sum(s["mismatch_sum"] for s in stats),
                    "mismatch_max": None if stats[0]["mismatch_max"] is None else max(s["mismatch_max"] for s in stats),
                    "mismatch_tokens": sum(s["mismatch_tokens"] for s in stats),
                    "clipped_tokens": None if stats[0]["clipped_tokens"] is None else sum(s["clipped_tokens"] for s in stats),
                })
        return out

    def _sample_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Every sample of the rows' prompts, prompt by prompt: (G * k, T)."""
        prompt_ids = [row["prompt_ids"] for row in rows for _ in row["completion_ids"]]
        return self.batch(prompt_ids, [c for row in rows for c in row["completion_ids"]])

    # ---- the reward learner: refit on every stored round ----

    def round_feedback(self, round_index: int, rows: list[dict] | None = None) -> RoundFeedback:
        """Features, feedback and bootstrap weights of one round (its rows, or the stored ones), cached."""
        if round_index in self.feedback:
            return self.feedback[round_index]
        rows = self.stored_rows([round_index]) if rows is None else rows
        k = self.args.samples_per_prompt
        prompts = [restored_prompt(row["prompt"], f"feedback store {self.store.directory}") for row in rows for _ in range(k)]
        phi = self.feature_map(prompts, [r for row in rows for r in row["responses"]])  # (G * k, d)
        phi = torch.as_tensor(phi, dtype=torch.float64).view(len(rows), k, -1)  # (G, k, d)
        if rows[0]["rewards"] is not None:
            rewards = torch.tensor([row["rewards"] for row in rows], dtype=torch.float64)  # (G, k)
            pairs = a_wins = None
            num_points = rewards.numel()
        else:
            rewards = None
            pairs = torch.tensor([[g, a, b] for g, row in enumerate(rows) for a, b in row["pairs"]])  # (P, 3)
            a_wins = torch.tensor([w for row in rows for w in row["a_wins"]], dtype=torch.float64)  # (P,)
            num_points = len(a_wins)
        weights = None
        if self.args.reward_learner == "ensemble":  # the online bootstrap: Poisson(1) per point and head
            g = torch.Generator().manual_seed(derived_seed(self.args.seed, round_index, "bootstrap"))
            weights = torch.poisson(torch.ones(num_points, self.args.ensemble_size, dtype=torch.float64), generator=g)
        self.feedback[round_index] = RoundFeedback(phi, rewards, pairs, a_wins, weights)
        return self.feedback[round_index]

    def fit_reward(self, round_index: int, rows: list[dict]) -> RewardLearner:
        """The learner fitted on rounds 0..round_index (this round's `rows` included), from scratch."""
        rounds = [self.round_feedback(r) for r in range(round_index)] + [self.round_feedback(round_index, rows)]
        args = self.args
        learner = build_reward_learner(args.reward_learner, self.feature_map.dim, ridge=args.ridge, gamma=args.gamma,
                                       r_max=args.r_max, num_heads=args.ensemble_size,
                                       prior_scale=args.prior_scale, seed=args.seed)
        data = [torch.cat(parts) for parts in zip(*(f.data() for f in rounds))]
        weights = torch.cat([f.weights for f in rounds]) if args.reward_learner == "ensemble" else None
        if rounds[0].rewards is not None:
            return learner.fit(*data, weights=weights)
        return learner.fit_preferences(*data, weights=weights, temperature=self.preference_temperature)

    @property
    def preference_temperature(self) -> float:
        """The BT link's T (config, else the oracle's): with T = 0.1 an unscaled fit would estimate 10 r, and
        clipping that at r_max = 1 would flatten every reward above 0.1, so r_tilde could never lead to pi*."""
        if self.args.preference_temperature is not None:
            return self.args.preference_temperature
        return getattr(self.oracle, "temperature", 1.0) if isinstance(self.oracle, BradleyTerryPreference) else 1.0

    # ---- update: RLOO toward the Gibbs policy of r_tilde ----

    def update(self, round_index: int, rows: list[dict]) -> dict[str, float]:
        args, k = self.args, self.args.samples_per_prompt
        learner = self.fit_reward(round_index, rows)
        r_hat, bonus, r_tilde = optimistic_rewards(learner, self.feedback[round_index].phi)  # (G, k) each
        if args.update_reward == "observed":  # the oracle's reward of each sample, lifted by the same bonus
            r_tilde = self.feedback[round_index].rewards + bonus
            r_tilde = r_tilde if args.r_max is None else r_tilde.clamp(max=args.r_max)
        old = torch.tensor([row["logprobs"] for row in rows], dtype=torch.float64)  # (G, k) s(y) under pi_old
        ref = torch.tensor([row["ref_logprobs"] for row in rows], dtype=torch.float64)  # (G, k)
        shaped = r_tilde - args.beta * (old - ref) if args.kl_penalty == "k1_in_reward" else r_tilde
        advantages = k / (k - 1) * (shaped - shaped.mean(1, keepdim=True))  # (G, k) R_i - mean_{j!=i} R_j

        mine = torch.arange(args.process_index, len(rows), args.world_size)  # this process's prompts
        size = args.per_device_train_batch_size // k  # prompts per mini-batch
        losses, clipped = [], []
        for _ in range(args.epochs_per_round):
            order = mine[torch.randperm(len(mine))]
            for start in range(0, len(order), size):
                idx = order[start : start + size]
                loss, clip_fraction = self._policy_loss([rows[i] for i in idx], advantages[idx], ref[idx])
                self.optimizer_step(loss)
                losses.append(loss.item())
                clipped.append(clip_fraction)
        return self._round_metrics(rows, r_hat, bonus, r_tilde, losses, clipped)

    def _policy_loss(self, rows: list[dict], advantages, ref) -> tuple[torch.Tensor, float]:
        """Clipped-ratio RLOO loss (+ beta * k3 with `k3_in_loss`) of B prompts' samples; (B, k) inputs.

        The PPO ratio pi / pi_old and the importance weight toward pi_old (when another sampler drew the
        samples) are taken per token (`importance_correction: token` or none) or per sequence (`sequence`);
        per token, sum_t min(r_t A, clip(r_t) A) has the sequence REINFORCE gradient A grad s(y) at r_t = 1."""
        args = self.args
        batch = self._sample_batch(rows)
        mask = batch["completion_mask"][:, 1:]  # (B * k, T-1)
        token_logps = token_logprobs(self.model_wrapped, **batch)  # (B * k, T-1) with gradients
        old = at_scored_positions([t for row in rows for t in row["token_logprobs"]], batch["completion_mask"])
        sampler = at_scored_positions([t for row in rows for t in (row["sampler_token_logprobs"] or [None])],
                                      batch["completion_mask"])
        advantages = advantages.flatten().to(device=token_logps.device, dtype=token_logps.dtype)  # (B * k,)
        old = old.to(token_logps)
        if args.importance_correction == "sequence":
            ratio = torch.exp((token_logps - old).mul(mask).sum(1))  # (B * k,)
            scaled = advantages
            weights = importance_weights(old, sampler, mask, "sequence", args.importance_cap)
        else:
            ratio = torch.exp((token_logps - old) * mask)  # (B * k, T-1): 1 off the completion
            scaled = advantages[:, None] * mask
            weights = importance_weights(old, sampler, mask, args.importance_correction, args.importance_cap)
        if weights is not None:
            scaled = scaled * weights
        clipped_ratio = ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
        objective = torch.min(ratio * scaled, clipped_ratio * scaled)  # (B * k) or (B * k, T-1)
        loss = -(objective if objective.dim() == 1 else objective.sum(1)).mean()
        if args.kl_penalty == "k3_in_loss":
            logps = (token_logps * mask).sum(1)
            loss = loss + args.beta * kl_k3(logps - ref.flatten().to(logps)).mean()
        outside = ((ratio - 1).abs() > args.clip_range).float()
        clip_fraction = (outside.mean() if outside.dim() == 1 else (outside * mask).sum() / mask.sum()).item()
        return loss, clip_fraction

    def _round_metrics(self, rows, r_hat, bonus, r_tilde, losses, clipped) -> dict[str, float]:
        """Means over the round's samples: the learner's rewards, the oracle's, KL of the sampling policy."""
        metrics = {
            "loss": sum(losses) / max(len(losses), 1),
            "reward_optimistic": r_tilde.mean().item(),
            "reward_fitted": r_hat.mean().item(),
            "bonus": bonus.mean().item(),
            "kl_k1": sum(sum(row["kl_k1"]) for row in rows) / (len(rows) * self.args.samples_per_prompt),
            "kl_k3": sum(sum(row["kl_k3"]) for row in rows) / (len(rows) * self.args.samples_per_prompt),
            "clip_fraction": sum(clipped) / max(len(clipped), 1),
            "oracle_queries": sum(row["oracle_queries"] for row in rows),
            "feedback_points": sum(len(f.data()[-1]) for f in self.feedback.values()),
            **mismatch_metrics(rows, cap=self.args.importance_cap),
        }
        if rows[0]["rewards"] is not None:
            rewards = [r for row in rows for r in row["rewards"]]
            metrics["oracle_reward"] = sum(rewards) / len(rewards)
        return metrics
