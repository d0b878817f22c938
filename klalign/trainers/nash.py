"""Nash learning from human feedback on the online loop: Nash-MP, its baselines, and the self-play family.

The regularised preference game `P_beta(pi > pi') = P(pi > pi') - beta KL(pi||pi_ref) + beta KL(pi'||pi_ref)`
has a unique symmetric equilibrium pi* (ALGORITHMS.md section 3). One round of the online loop is one
iteration k. `method` selects the iteration: nash_mp (Nash Mirror Prox, Tiapkin et al. 2025), its
baselines mirror_descent and nash_md (Munos et al. 2023), and the self-play family online_ipo
(Calandriello et al. 2024), egpo (Zhou et al. 2025), sppo (Wu et al. 2024) and nash_prox (the later
version of Tiapkin et al.). What each samples, which loss it takes, and its paper: the table
`klalign.trainers.nash_methods.METHODS`; each loss: `klalign.ops.nash_losses`; each exact tabular
iteration: `klalign.theory.games`.

Gradient estimators (one optimizer step per inner step). Policy-gradient methods: REINFORCE with the
baseline 1/2 on fresh samples of pi_theta, and each KL by the score function with per-token
reward-to-go (`klalign.ops.nash_losses.prox_policy_gradient_loss`). The IPO-type and SPPO losses are
differentiated directly. Every loss is scaled so that the same learning rate is the same step for
every method (`klalign.ops.nash_losses`). P(y > y') is the oracle's probability, or a 0/1 label drawn
from it (`sample_labels`). Sampling must be on-policy: temperature 1 and top_p 1 are required.

Snapshots. theta_k (the anchor and the half step's opponent) and theta_{k+1/2} are copies of the
trainable parameters held in memory: with LoRA the adapter only (the base weights are shared, and
the reference is the disabled adapter), otherwise all weights. Peak extra memory is three copies of
the trainable parameters (theta_k, theta_{k+1/2}, and the current iterate while an opponent is
swapped in) plus the frozen reference when fine-tuning fully; under ZeRO-3 each process holds only
its own partition of each copy, 1/world of it (`klalign.models.snapshots`; `bench/snapshot_memory.py`).
To sample the opponent or read pi_k's log-probs the snapshot is swapped into the policy, so generation
takes the policy's usual path (under ZeRO-3 each process writes its own partition: no gather for the
swap). Under DeepSpeed with bf16 (or fp16) the optimizer
keeps fp32 master weights: theta_k's masters are kept too (`klalign.models.snapshots`), and the full step
restarts from them exactly, so updates below half a bf16 ulp survive the reset. Nothing is written
to disk: a resumed round restarts from its checkpoint (theta_k) and replays every inner step from
the stored samples.

Optimizer. A prox step is a new problem started from theta_k: for nash_mp, mirror_descent, nash_md,
sppo and nash_prox the optimizer's state (Adam's moments and step count) is cleared at the start of
every prox step, so the full step does not inherit moments of the half step's objective. EGPO
restores the state saved at theta_k for its full step; online IPO keeps its state (a single loop).
`anneal_prox_steps` decays the step size within every prox step (a constant one leaves the prox
solution a noise floor).

Rows. Every inner step's samples are a collection chunk of the round (`OnlineTrainer.collected`):
stored as they are queried, reused on resume. The first inner step's samples, drawn while the
policy is still pi_k, are the round's `collect`. After the iteration, fresh samples of pi_{k+1}
are compared with pi_ref and pi_k (win rates; their queries are counted apart from training's).
"""

from __future__ import annotations

import math

import torch
from transformers.utils import logging

from klalign.data.prompts import stored_prompt
from klalign.generation.geometric_mixture import sample_geometric_mixture
from klalign.generation.hf import stop_token_ids
from klalign.models.placement import gathered_for_generation
from klalign.models.snapshots import (
    clear_optimizer_state,
    inner_optimizer,
    master_weights,
    optimizer_state,
    reset,
    restore_optimizer_state,
    swapped,
    take_snapshot,
)
from klalign.ops.importance import (
    at_scored_positions,
    importance_weights,
    mismatch_metrics,
    sample_statistics,
)
from klalign.ops.logprobs import token_logprobs
from klalign.ops.nash_losses import (
    prox_policy_gradient_loss,
    self_play_ipo_loss,
    sppo_loss,
)
from klalign.oracles.base import PreferenceOracle
from klalign.trainers.nash_config import NLHFConfig
from klalign.trainers.nash_methods import (
    LOSS_FUNCTIONS,
    LOSS_METRIC,
)
from klalign.trainers.nash_win_rates import win_rates
from klalign.trainers.online import OnlineTrainer

logger = logging.get_logger(__name__)


class NLHFTrainer(OnlineTrainer):
    """Nash-MP, mirror descent, Nash-MD, online IPO, EGPO, SPPO and Nash Prox with a pairwise preference oracle.

    Arguments as `OnlineTrainer`, plus `eval_dataset`: prompts for the win rates (default: the
    training prompts).
    """

    oracle_kind = (PreferenceOracle,)

    def __init__(self, model, ref_model=None, args: NLHFConfig | None = None, train_dataset=None,
                 processing_class=None, oracle=None, peft_config=None, callbacks=None, eval_dataset=None):
        if not isinstance(args, NLHFConfig):
            raise TypeError(f"args must be a NLHFConfig, got {type(args).__name__}")
        super().__init__(model, ref_model, args, train_dataset, processing_class, oracle, peft_config, callbacks)
        self.win_rate_pool = self.prompts if eval_dataset is None else list(eval_dataset["prompt"])
        self.method = args.nash_method
        self.round_schedule = not args.anneal_prox_steps  # annealing restarts the schedule at every prox step
        self._mismatch: list[dict] = []  # the round's sampler/learner mismatch, per sample (klalign.ops.importance)
        if args.generation_backend == "vllm" and args.method == "nash_md":
            logger.warning("nash_md: the opponent is a token-level geometric mixture of the policy and pi_ref, which vLLM "
                           "cannot sample: the opponent's samples come from HF generate, the policy's from vLLM")

    def steps_per_round(self) -> int:
        return len(self.args.prox_steps) * self.args.inner_steps

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With `anneal_prox_steps`, lr * (1 + cos(pi m / M)) / 2 at inner step m of every prox step."""
        if not self.args.anneal_prox_steps:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            M = self.args.inner_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer if optimizer is None else optimizer,
                lambda step: (1 + math.cos(math.pi * (step % M) / M)) / 2,
            )
            self._created_lr_scheduler = True  # private: klalign.internals
        return self.lr_scheduler

    def chunks_per_step(self) -> int:
        return math.ceil(self.args.prompts_per_round / self.args.prompts_per_chunk)

    @property
    def _policy(self):
        """The unwrapped policy (the Trainer keeps it as `model` beside `model_wrapped`)."""
        return self.model

    # ---- collect: the first inner step's samples (the policy is still pi_k) ----

    def collect(self, round_index: int, prompts: list) -> list[dict]:
        if self.method.pairs == "groups":
            return self._sample_groups(prompts)
        return self._sample_pairs(prompts, step=0, opponent=None)

    def _sample_pairs(self, prompts: list, step: int, opponent: dict | None, opponent_key=None) -> list[dict]:
        """`samples_per_prompt` pairs (y, y') per prompt, as the method draws them, and P(y > y').

        `opponent_key` names the opponent's weights for a vLLM engine (None: the current policy)."""
        n, kind = self.args.samples_per_prompt, self.method.pairs
        if kind == "policy_vs_opponent":
            ours = [c for per_prompt in self.generate(prompts, n) for c in per_prompt]
            with swapped(self._policy, opponent):  # opponent None: pi_k is the current policy (step 0)
                theirs = [c for per_prompt in self._opponent_samples(prompts, n, opponent_key) for c in per_prompt]
        else:  # both from the opponent (egpo), or both from the current policy (self-play)
            from_opponent = kind == "opponent_pair"
            with swapped(self._policy, opponent if from_opponent else None):
                both = self.generate(prompts, 2 * n, weights=opponent_key if from_opponent else None)
            ours = [c for per_prompt in both for c in per_prompt[:n]]
            theirs = [c for per_prompt in both for c in per_prompt[n:]]
        probs = self.oracle.preference([c.prompt for c in ours], [c.text for c in ours], [c.text for c in theirs])
        labels = torch.bernoulli(probs) if self.args.sample_labels else probs  # (N,)
        phase, inner = divmod(step, self.args.inner_steps)
        name = self.args.prox_steps[phase]
        return [
            {"prompt": stored_prompt(y.prompt), "prompt_ids": y.prompt_ids, "completion_ids": y.completion_ids,
             "completion": y.text, "opponent_ids": o.completion_ids, "opponent": o.text, "preference_prob": p,
             "label": label, "prox_step": name, "inner_step": inner, "opponent_policy": self._opponent_name(name),
             "oracle_queries": 1, "sampler_logprobs": y.importance_logprobs}
            for y, o, p, label in zip(ours, theirs, probs.tolist(), labels.tolist())
        ]

    def _opponent_name(self, phase: str) -> str:
        """Which policy the second sample of a pair (both, for egpo) comes from."""
        if self.args.method == "nash_md":
            return "mixture(pi_k, pi_ref)"
        if self.method.pairs == "self_play":
            return "pi_theta"
        return "pi_k+1/2" if phase == "full" and len(self.args.prox_steps) == 2 else "pi_k"

    def _opponent_samples(self, prompts: list, n: int, key=None):
        """Samples of the policy now in the model, or of its geometric mixture with pi_ref (Nash-MD: with HF
        `generate` on every backend, since vLLM cannot sample a token-level mixture of two models)."""
        if self.args.method != "nash_md":
            return self.generate(prompts, n, weights=key)
        with (gathered_for_generation(self.model_wrapped, self.accelerator) as unwrapped,
              self.reference.mixture_partner(unwrapped) as reference):
            was_training = unwrapped.training
            unwrapped.eval()
            samples = sample_geometric_mixture(
                unwrapped, reference, self.processing_class, prompts, n, self.args.eta * self.args.beta,
                self.args.max_new_tokens, self.args.generation_batch_size, device=self.args.device,
                stop_ids=stop_token_ids(unwrapped, self.processing_class),
            )
            unwrapped.train(was_training)
        return samples

    def _sample_groups(self, prompts: list) -> list[dict]:
        """SPPO: K samples of pi_k per prompt, every pair compared, leave-one-out win rates, s_k cached."""
        K = self.args.samples_per_prompt
        groups = self.generate(prompts, K)
        pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
        flat = [(g, i, j) for g in groups for i, j in pairs]
        probs = self.oracle.preference([g[i].prompt for g, i, _ in flat], [g[i].text for g, i, _ in flat],
                                       [g[j].text for g, _, j in flat])
        labels = (torch.bernoulli(probs) if self.args.sample_labels else probs).view(len(groups), len(pairs))
        wins = torch.full((len(groups), K, K), 0.0, dtype=torch.float64)  # (G, K, K) P(y_i > y_j)
        for p, (i, j) in enumerate(pairs):
            wins[:, i, j], wins[:, j, i] = labels[:, p], 1 - labels[:, p]
        win_rates = wins.sum(-1) / (K - 1)  # (G, K): leave-one-out estimate of P(y_i > pi_k), unbiased
        samples = [c for g in groups for c in g]
        batch = self.batch([c.prompt_ids for c in samples], [c.completion_ids for c in samples])
        anchor_logps = self.policy_token_logprobs(batch, samples).sum(1).double().cpu().view(len(groups), K)  # s_k(y)
        return [
            {"prompt": stored_prompt(g[0].prompt), "prompt_ids": g[0].prompt_ids,
             "completion_ids": [c.completion_ids for c in g], "completions": [c.text for c in g],
             "pairs": [list(pair) for pair in pairs], "preference_probs": pr, "labels": lab, "win_rates": wr,
             "anchor_logprobs": s_k, "prox_step": "full", "inner_step": 0, "opponent_policy": "pi_k",
             "oracle_queries": len(pairs)}
            for g, pr, lab, wr, s_k in zip(groups, probs.view(len(groups), -1).tolist(), labels.tolist(),
                                            win_rates.tolist(), anchor_logps.tolist())
        ]

    # ---- update: the prox steps ----

    def update(self, round_index: int, rows: list[dict]) -> dict[str, float]:
        engine = self.model_wrapped if self.is_deepspeed_enabled else None
        anchor = take_snapshot(self._policy)  # theta_k as the model computes with it: pi_k, swapped in
        start = take_snapshot(self._policy, engine) if master_weights(engine) else anchor  # fp32 masters
        saved = self._optimizer_state() if self.method.optimizer_state == "restore" else None
        metrics: dict[str, float] = {}
        opponent, queries = anchor, 0
        for phase, name in enumerate(self.args.prox_steps):
            if phase > 0:  # the full step of a two-phase method: opponent pi_{k+1/2}, restart from theta_k
                opponent = take_snapshot(self._policy)
                reset(self._policy, start, engine)
                self.weights_changed()
                if saved is not None:
                    self._restore_optimizer_state(saved)
            if self.method.optimizer_state == "fresh":
                self._fresh_optimizer_state()
            stats, used = self._prox_step(round_index, phase, rows if phase == 0 else None, anchor, opponent)
            metrics.update({f"{name}/{k}": v for k, v in stats.items()})
            queries += used
        metrics["loss"] = metrics[f"full/{LOSS_METRIC[self.method.loss]}"]
        metrics.update(mismatch_metrics(self._mismatch, cap=self.args.importance_cap))
        self._mismatch = []
        metrics.update(self.query_counts("preference_queries", queries))
        metrics.update(win_rates(self, round_index, anchor))
        return metrics

    def _prox_step(self, round_index: int, phase: int, first_rows, anchor: dict, opponent: dict):
        """M optimizer steps on the method's loss from the current parameters (theta_k, or theta_t for
        online IPO). Returns the statistics averaged over the steps and the preference queries used."""
        rank, world = self.args.process_index, self.args.world_size
        prompts = self.round_prompts(round_index)  # the prox problem's prompts, the round's collection
        totals: dict[str, float] = {}
        queries = 0
        for inner in range(self.args.inner_steps):
            step = phase * self.args.inner_steps + inner
            if self.method.pairs == "groups":  # a regression on pi_k's samples: every step reuses them
                rows = first_rows
            else:
                rows = first_rows if step == 0 else self._step_rows(round_index, step, prompts, opponent)
            if step == 0 or self.method.pairs != "groups":
                queries += sum(r["oracle_queries"] for r in rows)  # rows of every process
            loss_fn = getattr(self, LOSS_FUNCTIONS[self.method.loss])
            loss, stats = loss_fn(rows[rank::world], None if inner == 0 else anchor)
            self.optimizer_step(loss)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value / self.args.inner_steps
        return totals, queries

    def _step_rows(self, round_index: int, step: int, prompts: list, opponent: dict) -> list[dict]:
        """The pairs of inner step `step` (fresh samples of the current pi_theta), chunk by chunk."""
        rank, world, size = self.args.process_index, self.args.world_size, self.args.prompts_per_chunk
        rows = []
        for j, start in enumerate(range(0, len(prompts), size)):
            chunk = prompts[start : start + size][rank::world]
            chunk_index = step * self.chunks_per_step() + j
            key = ("opponent", round_index, step // self.args.inner_steps)  # pi_k or pi_k+1/2 of this round
            rows += self.collected(round_index, chunk_index, lambda: self._sample_pairs(chunk, step, opponent, key))
        return rows

    # ---- the losses (klalign.ops.nash_losses) on a batch of rows ----

    def _anchor_logprobs(self, batch: dict, anchor: dict | None, pairs: bool = False) -> torch.Tensor | None:
        """Per-token log pi_k, read with theta_k swapped in (B, T-1); None when theta is theta_k (anchor None):
        the caller uses its own log-probs. Called before the forward pass with gradients, which the swap
        would invalidate."""
        if anchor is None:
            return None
        with swapped(self._policy, anchor):
            return self.frozen_policy_token_logprobs(batch, pairs)

    def _mean_over_processes(self, values: list[torch.Tensor]) -> list[float]:
        return self.accelerator.reduce(torch.stack(values), "mean").tolist()

    def _policy_gradient_loss(self, rows: list[dict], anchor: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        """nash_mp, mirror_descent, nash_md: the prox loss L's surrogate and L's estimate (k1 KLs)."""
        batch = self.batch([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
        mask = batch["completion_mask"][:, 1:].float()  # (B, T-1): token t+1 is scored at t
        ref_logps = self.reference.token_logprobs(self.model_wrapped, batch)  # (B, T-1)
        anchor_logps = self._anchor_logprobs(batch, anchor)
        logps = token_logprobs(self.model_wrapped, **batch)  # (B, T-1), with gradients
        anchor_logps = logps.detach() if anchor_logps is None else anchor_logps
        win = torch.tensor([r["label"] for r in rows], dtype=logps.dtype, device=logps.device)  # (B,)
        weights = self._importance_weights(rows, logps.detach(), batch)  # (B, T-1), (B,) or None
        surrogate, parts = prox_policy_gradient_loss(logps, ref_logps, anchor_logps, mask, win, self.args.beta,
                                                     self.args.anchor_coef, weights)
        win_rate, kl_ref, kl_anchor = self._mean_over_processes(list(parts.mean(0)))
        return surrogate, {"prox_loss": -win_rate + self.args.beta * kl_ref + self.args.anchor_coef * kl_anchor,
                           "win_rate_vs_opponent": win_rate, "kl_ref": kl_ref, "kl_anchor": kl_anchor}

    def _self_play_ipo_loss(self, rows: list[dict], anchor: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        """online_ipo, egpo (base pi_ref, tau = beta) and nash_prox (base ref^w pi_k^(1-w), tau = beta + 1/eta)."""
        B = len(rows)
        batch = self.batch([r["prompt_ids"] for r in rows] * 2,
                           [r["completion_ids"] for r in rows] + [r["opponent_ids"] for r in rows])  # y then y'
        pi_k = self._anchor_logprobs(batch, anchor, pairs=True) if self.args.method == "nash_prox" else None
        pairs = self.args.share_prompt  # y and y' answer one prompt: run it once
        logps = token_logprobs(self.model_wrapped, **batch, pairs=pairs).sum(1).view(2, B).T  # (B, 2), with gradients
        ref = self.reference.token_logprobs(self.model_wrapped, batch, pairs).sum(1).view(2, B).T  # (B, 2)
        base, tau, stats = ref, self.args.beta, {}
        if self.args.method == "nash_prox":
            pi_k = logps.detach() if pi_k is None else pi_k.sum(1).view(2, B).T  # (B, 2)
            w = self.args.ref_weight
            base, tau = w * ref + (1 - w) * pi_k, self.args.beta + 1 / self.args.eta
            stats["logratio_anchor"] = (logps.detach() - pi_k).mean()
        label = torch.tensor([r["label"] for r in rows], dtype=logps.dtype, device=logps.device)  # (B,)
        per_pair = self_play_ipo_loss(logps, base, label, tau)  # (B,)
        stats = {"self_play_ipo_loss": per_pair.detach().mean(), "win_rate_vs_opponent": label.mean(),
                 "logratio_ref": (logps.detach() - ref).mean(), **stats}
        return per_pair.mean(), dict(zip(stats, self._mean_over_processes(list(stats.values()))))

    def _sppo_loss(self, groups: list[dict], anchor: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        """sppo: regression of s_theta(y) on the regularised prox target, over every sample of every group."""
        K, beta, eta = self.args.samples_per_prompt, self.args.beta, self.args.eta
        batch = self.batch([g["prompt_ids"] for g in groups for _ in range(K)],
                           [c for g in groups for c in g["completion_ids"]])
        logps = self.policy_logprobs(batch)  # (G*K,) with gradients
        ref = self.reference_logprobs(batch)  # (G*K,)
        as_tensor = lambda key: torch.tensor([x for g in groups for x in g[key]], dtype=logps.dtype,
                                             device=logps.device)
        pi_k, win_rates = as_tensor("anchor_logprobs"), as_tensor("win_rates")  # (G*K,) each
        step = eta / (1 + eta * beta)  # SPPO's eta_s; w = eta_s beta
        target = (1 - step * beta) * pi_k + step * beta * ref + step * (win_rates - 0.5)  # (G*K,)
        per_sample = sppo_loss(logps, target, beta + 1 / eta)
        stats = {"sppo_loss": per_sample.detach().mean(), "kl_ref": (logps.detach() - ref).mean(),
                 "kl_anchor": (logps.detach() - pi_k).mean()}
        return per_sample.mean(), dict(zip(stats, self._mean_over_processes(list(stats.values()))))

    # ---- optimizer state (klalign.models.snapshots) ----

    def _inner_optimizer(self):
        return inner_optimizer(self.optimizer)

    def _fresh_optimizer_state(self) -> None:
        clear_optimizer_state(self.optimizer)

    def _optimizer_state(self):
        return optimizer_state(self.optimizer)

    def _restore_optimizer_state(self, saved) -> None:
        restore_optimizer_state(self.optimizer, saved)

    def _importance_weights(self, rows: list[dict], logps: torch.Tensor, batch: dict) -> torch.Tensor | None:
        """Truncated importance weights of the rows' samples toward pi_theta (klalign.ops.importance): (B, T-1)
        per token, (B,) per sequence, None without a correction; and the sampler/learner mismatch of the step,
        recorded for the round's metrics."""
        sampler = [r.get("sampler_logprobs") for r in rows]
        sampled = sample_statistics(logps, batch["completion_mask"], sampler, self.args.importance_cap)
        self._mismatch += [x for x in sampled if x["mismatch_sum"] is not None]
        return importance_weights(logps, at_scored_positions(sampler, batch["completion_mask"]),
                                  batch["completion_mask"][:, 1:], self.args.importance_correction,
                                  self.args.importance_cap)

    # ---- metrics ----

    def query_counts(self, name: str, this_round: int) -> dict[str, float]:
        """This round's count and the running total (from the logged history, so resume continues it)."""
        before = next((h[name] for h in reversed(self.state.log_history) if name in h), 0)
        return {name: before + this_round, f"{name}_round": this_round}


NashMPTrainer = NLHFTrainer  # the name before the trainer ran every NLHF method
