"""Online iterative DPO / RSO with an exploring enhancer: GSHF (Xiong et al., ICML 2024; ALGORITHMS.md section 2).

Round t: the main agent (the current policy) and an enhancer each propose a response per prompt;
the oracle says which is preferred; the pairs join the feedback store; the policy is trained with
a preference loss (DPO sigmoid, RSO hinge, ...) on the data so far or on the latest round, from
its current weights, against the reference (the initial policy, as in the paper, or the previous
iterate). Enhancers, selected by `enhancer` (see `klalign.trainers.enhancers`):

- best_vs_worst: n samples from the main agent, scored by a reward; the best against the worst.
- all_pairs: n samples from the main agent, scored by a reward; every pair of them.
- temperature: the main agent at its temperature against itself at `enhancer_temperature`.
- previous_checkpoint: the main agent against the policy of the previous round.
- rejection_sampling: n samples from the main agent, kept by rejection sampling toward
  pi_t * exp(r / beta) (RSO), best and worst kept samples.
- uncertainty: of n samples from the main agent, the pair maximising ||phi1 - phi2||_{Sigma^-1}
  for a frozen feature map phi (the reference's mean last hidden state), Sigma = lam I + sum of
  past pairs' outer products.

A pair's label enters the loss by `pair_labels`. 'expected' (the default): the loss averaged over the
Bradley-Terry label, P(a > b) the preference oracle's probability or sigmoid(r_a - r_b) for a reward
oracle, so the population optimum is the tilt pi_ref exp(r / beta), the maximiser of J = E r - beta KL
(ALGORITHMS.md section 2); reward ties are trained on at P = 1/2. 'drawn': one label per pair, drawn from
P(a > b) for a preference oracle, the higher reward for a reward oracle (TRL's OnlineDPO, GSHF's
experiments); ties carry no preference and are dropped. Deterministic labels are the BT preference of an
infinitely scaled reward: DPO then drives the margins without bound and overshoots the KL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from klalign.data.prompts import stored_prompt
from klalign.ops.importance import (
    at_scored_positions,
    importance_weights,
    mismatch_metrics,
    sample_statistics,
    weighted_kl,
)
from klalign.ops.preference_losses import (
    PREFERENCE_LOSSES,
    bradley_terry_probability,
    expected_label_loss,
    get_preference_loss,
)
from klalign.oracles.base import PreferenceOracle, RewardOracle
from klalign.trainers.enhancers import ENHANCERS, PairProposal
from klalign.trainers.online import OnlineTrainer
from klalign.trainers.online_config import OnlineConfig

logger = logging.get_logger(__name__)


@dataclass
class IterativeDPOConfig(OnlineConfig):
    """GSHF settings (plus OnlineConfig and TrainingArguments)."""

    loss_type: str = field(default="sigmoid", metadata={"help": f"Preference loss, one of {sorted(PREFERENCE_LOSSES)}."})
    enhancer: str = field(default="best_vs_worst", metadata={"help": f"How the exploring response is chosen: {sorted(ENHANCERS)}."})
    samples_per_prompt: int = field(
        default=4, metadata={"help": "Candidates per prompt for best_vs_worst, rejection_sampling and uncertainty."}
    )
    enhancer_temperature: float = field(default=1.5, metadata={"help": "Temperature of the 'temperature' enhancer."})
    reference: str = field(
        default="initial", metadata={"help": "'initial': pi_0 (the paper); 'previous': the policy at the round's start."}
    )
    train_on: str = field(default="all", metadata={"help": "'all' rounds so far, or the 'latest' round only."})
    pair_labels: str = field(
        default="expected",
        metadata={"help": "'expected': the loss averaged over each pair's Bradley-Terry label (P from the preference "
                          "oracle, or sigmoid(r_a - r_b) from a reward oracle): DPO's optimum is then the tilt "
                          "pi_ref exp(r / beta). 'drawn': one label per pair (a draw, or the higher reward)."},
    )
    epochs_per_round: int = field(default=2, metadata={"help": "Passes over the training pairs each round."})
    uncertainty_ridge: float = field(default=1.0, metadata={"help": "lam of Sigma = lam I + sum dphi dphi^T."})

    def __post_init__(self):
        get_preference_loss(self.loss_type)
        choices = {"enhancer": sorted(ENHANCERS), "reference": ["initial", "previous"], "train_on": ["all", "latest"],
                   "pair_labels": ["expected", "drawn"]}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        super().__post_init__()


class IterativeDPOTrainer(OnlineTrainer):
    """GSHF: online iterative DPO/RSO with an exploring enhancer (see the module docstring)."""

    oracle_kind = (RewardOracle, PreferenceOracle)

    def __init__(self, model, ref_model=None, args: IterativeDPOConfig | None = None, train_dataset=None,
                 processing_class=None, oracle=None, peft_config=None, callbacks=None):
        if not isinstance(args, IterativeDPOConfig):
            raise TypeError(f"args must be an IterativeDPOConfig, got {type(args).__name__}")
        enhancer_cls = ENHANCERS[args.enhancer]
        if enhancer_cls.needs_reward and not isinstance(oracle, RewardOracle):
            raise TypeError(f"enhancer {args.enhancer!r} ranks n samples and needs a RewardOracle, got "
                            f"{type(oracle).__name__}")
        super().__init__(model, ref_model, args, train_dataset, processing_class, oracle, peft_config, callbacks)
        if args.temperature != 1.0 or args.top_p != 1.0:  # DPO itself needs no on-policy samples; the KL estimates do
            logger.warning(f"temperature={args.temperature}, top_p={args.top_p}: the logged kl_k1 and kl_k3 are "
                           "estimated on samples of the tempered or truncated policy, not of pi, and are biased")
        self.enhancer = enhancer_cls(self)
        self.preference_loss = get_preference_loss(args.loss_type)

    # ---- collect: propose pairs, ask the oracle, keep the labelled pairs ----

    def collect(self, round_index: int, prompts: list) -> list[dict]:
        proposals = self.enhancer.propose(round_index, prompts)
        labelled = self._label(proposals)
        # Ties are stored too (everything the oracle answered is kept) and skipped in training.
        rows = [self._row(p, a_wins) for p, a_wins in zip(proposals, labelled)]
        pair_tokens = None
        if self.args.reference == "initial":  # a fixed reference: its log-probs are computed once, here, and stored
            pair_tokens = []
            for row, (chosen, rejected) in zip(rows, self._reference_pair_logps(rows, pair_tokens).tolist()):
                row["ref_chosen_logp"], row["ref_rejected_logp"] = chosen, rejected
        main = self._main_statistics(proposals, self._main_reference_from_pairs(proposals, labelled, pair_tokens))
        return [{**row, **stats} for row, stats in zip(rows, main)]

    def _main_reference_from_pairs(self, proposals, labelled, pair_tokens) -> list | None:
        """Each main sample's per-token reference log-probs, taken from the pairs' reference pass when the main
        sample is one of its pair (always with best vs worst of 2): the same tokens are not run through the
        reference twice. None (the main samples get their own pass) when any main sample, on any process, is not."""
        found = []
        for p, a_wins, tokens in zip(proposals, labelled, pair_tokens or [None] * len(proposals)):
            chosen, rejected = (p.a, p.b) if a_wins in (True, None) else (p.b, p.a)
            found.append(tokens[0] if tokens is not None and p.main is chosen else
                         tokens[1] if tokens is not None and p.main is rejected else None)
        missing = torch.tensor(float(sum(t is None for t in found)), device=self.args.device)
        return None if self.accelerator.reduce(missing, "sum").item() > 0 else found

    def _label(self, proposals: list[PairProposal]) -> list[bool | None]:
        """True if `a` is preferred, False if `b`, None for no preference (a reward tie)."""
        todo = [p for p in proposals if not p.ranked]
        if todo:
            texts = [p.prompt for p in todo]
            a, b = [p.a.text for p in todo], [p.b.text for p in todo]
            if isinstance(self.oracle, PreferenceOracle):
                probs = self.oracle.preference(texts, a, b)  # (N,)
                wins = torch.bernoulli(probs).bool().tolist()
                for p, prob, win in zip(todo, probs.tolist(), wins):
                    p.a_preferred, p.preference_prob, p.ranked = win, prob, True
            else:
                ra, rb = self.oracle.score(texts, a), self.oracle.score(texts, b)
                for p, x, y in zip(todo, ra.tolist(), rb.tolist()):
                    p.reward_a, p.reward_b, p.main_reward = x, y, x  # `a` is the main agent's sample
                    p.a_preferred, p.ranked = (None if x == y else x > y), True
                    p.queries = 2
        return [p.a_preferred for p in proposals]

    @torch.no_grad()
    def _main_statistics(self, proposals: list[PairProposal], reference_tokens: list | None = None) -> list[dict]:
        """Per main-agent sample: log pi_t(y) - log pi_ref(y), the sample's k1 and k3 estimates of the KL
        (importance-weighted toward pi_t when another sampler drew it), and the sampler's log-prob, mismatch
        and clipping (`klalign.ops.importance`). `reference_tokens`: each sample's per-token log pi_ref, in the
        layout of its own row (`_main_reference_from_pairs`); None: a reference pass here."""
        mains = [p.main for p in proposals]
        batch = self.batch([c.prompt_ids for c in mains], [c.completion_ids for c in mains])
        mask = batch["completion_mask"][:, 1:]  # (B, T-1): the scored positions
        token_logps = self.policy_token_logprobs(batch, mains)  # (B, T-1): the sampler's, where it is pi_t
        if reference_tokens is None:
            ref_logps = self.reference.token_logprobs(self.model_wrapped, batch)  # (B, T-1)
        else:  # right-padded rows of one prompt: the same positions, up to each row's width
            ref_logps = torch.zeros_like(token_logps)
            for i, tokens in enumerate(reference_tokens):
                width = min(len(tokens), ref_logps.size(1))
                ref_logps[i, :width] = tokens[:width]
        token_logratio = token_logps - ref_logps  # (B, T-1)
        other = [c.importance_logprobs for c in mains]  # None where pi_t itself drew them
        sampler = at_scored_positions(other, batch["completion_mask"])
        weights = importance_weights(token_logps, sampler, mask, self.args.importance_correction,
                                     self.args.importance_cap)
        k1, k3 = weighted_kl(token_logratio, mask, weights)  # (B,) each
        sampled = sample_statistics(token_logps, batch["completion_mask"], other, self.args.importance_cap)
        return [{"main_logratio": l, "main_kl_k1": a, "main_kl_k3": b, **{f"main_{k}": v for k, v in stats.items()}}
                for l, a, b, stats in zip((token_logratio * mask).sum(1).tolist(), k1.tolist(), k3.tolist(), sampled)]

    @staticmethod
    def _row(p: PairProposal, a_wins: bool | None) -> dict:
        tie = a_wins is None
        a_wins = True if tie else a_wins
        chosen, rejected = (p.a, p.b) if a_wins else (p.b, p.a)
        return {
            "tie": tie,
            "prompt": stored_prompt(p.prompt),
            "prompt_ids": chosen.prompt_ids,
            "chosen": chosen.text, "chosen_ids": chosen.completion_ids,
            "rejected": rejected.text, "rejected_ids": rejected.completion_ids,
            "chosen_policy": p.policy_a if a_wins else p.policy_b,
            "rejected_policy": p.policy_b if a_wins else p.policy_a,
            "preference_prob": None if p.preference_prob is None else (
                p.preference_prob if a_wins else 1 - p.preference_prob),
            "chosen_reward": p.reward_a if a_wins else p.reward_b,
            "rejected_reward": p.reward_b if a_wins else p.reward_a,
            "main_reward": p.main_reward,
            "oracle_queries": p.queries,
        }

    # ---- update: DPO/RSO epochs on the pairs ----

    def update(self, round_index: int, rows: list[dict]) -> dict[str, float]:
        """`epochs_per_round` passes of minibatch DPO/RSO over the pairs.

        Every process shuffles all pairs the same way (the loop seeds the update identically) and
        takes its slice of each global batch of `per_device_train_batch_size * world_size` pairs,
        so the averaged gradient is the global batch's: N processes step like one process with the
        same global batch.
        """
        train_rows = rows if self.args.train_on == "latest" else self._all_rows(round_index, rows)
        if self.args.pair_labels == "drawn":  # a tie says nothing about which is better; under 'expected' it says P = 1/2
            train_rows = [r for r in train_rows if not r["tie"]]
        ref_logps = self._pair_reference(train_rows)  # (N, 2), fixed for the round
        rank, world = self.args.process_index, self.args.world_size
        global_batch = self.args.per_device_train_batch_size * world
        starts = range(0, len(train_rows) - world + 1, global_batch)  # every process gets >= 1 pair
        self.begin_update(self.args.epochs_per_round * len(starts))
        losses, margins = [], []
        for _ in range(self.args.epochs_per_round):
            order = torch.randperm(len(train_rows)).tolist()
            for start in starts:
                batch = order[start : start + global_batch]
                idx = batch[rank::world]
                per_pair, margin = self._pair_loss([train_rows[i] for i in idx], ref_logps[idx])
                # Sum / global size, times world: gradient averaging over processes gives the
                # global batch's mean even when the processes hold unequal numbers of pairs.
                loss = per_pair.sum() * world / len(batch)
                self.optimizer_step(loss)
                losses.append(self.accelerator.reduce(loss.detach(), "mean").item())
                margins += margin.tolist()
        return self._round_metrics(rows, train_rows, losses, margins)

    def _all_rows(self, round_index: int, rows: list[dict]) -> list[dict]:
        return self.stored_rows(range(round_index)) + rows

    def _pair_batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows, (2B, T), like TRL's preference collator."""
        prompts = [r["prompt_ids"] for r in rows] * 2
        completions = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        return self.batch(prompts, completions)

    def _pair_reference(self, rows: list[dict]) -> torch.Tensor:
        """Reference s(y) of every training pair (N, 2): stored with the pair when the reference is the fixed
        pi_0 (each pair's log-probs computed once, by the process that collected it), else computed now
        (`reference: previous`: the policy at the round's start, or a store written without them)."""
        if self.args.reference == "initial" and all(r.get("ref_chosen_logp") is not None for r in rows):
            stored = [[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in rows]
            return torch.tensor(stored, dtype=torch.float32, device=self.args.device).reshape(-1, 2)
        return self._reference_pair_logps(rows)

    @torch.no_grad()
    def _reference_pair_logps(self, rows: list[dict], token_logps: list | None = None) -> torch.Tensor:
        """Reference s(y) for every pair. (N, 2): chosen, rejected. `token_logps`: a list that gets each pair's
        per-token log-probs, ((T-1,) chosen, (T-1,) rejected) in the layout of the pair's rows."""
        use_previous = self.args.reference == "previous"
        out = []
        for start in range(0, len(rows), self.args.per_device_train_batch_size):
            batch = self._pair_batch(rows[start : start + self.args.per_device_train_batch_size])
            pairs = self.args.share_prompt  # each prompt run once
            tokens = (self.frozen_policy_token_logprobs(batch, pairs) if use_previous
                      else self.reference.token_logprobs(self.model_wrapped, batch, pairs))  # (2B, T-1)
            chosen, rejected = tokens.chunk(2)  # (B, T-1) each
            if token_logps is not None:
                token_logps += list(zip(chosen, rejected))
            out.append(torch.stack([chosen.sum(1), rejected.sum(1)], dim=1))  # (B, 2)
        return torch.cat(out) if out else torch.zeros(0, 2, device=self.args.device)

    def _pair_loss(self, rows: list[dict], ref_logps: torch.Tensor):
        batch = self._pair_batch(rows)
        chosen, rejected = self.policy_logprobs(batch, pairs=True).chunk(2)  # (B,) each: each prompt run once
        chosen_ratio, rejected_ratio = chosen - ref_logps[:, 0], rejected - ref_logps[:, 1]
        lengths = batch["completion_mask"].sum(dim=1).to(chosen.dtype)
        if self.args.pair_labels == "expected":
            per_pair = expected_label_loss(self.preference_loss, chosen_ratio, rejected_ratio, *lengths.chunk(2),
                                           self.args.beta, self._label_probabilities(rows).to(chosen))  # (B,)
        else:
            per_pair = self.preference_loss(chosen_ratio, rejected_ratio, *lengths.chunk(2), self.args.beta)  # (B,)
        return per_pair, (self.args.beta * (chosen_ratio - rejected_ratio)).detach()

    @staticmethod
    def _label_probabilities(rows: list[dict]) -> torch.Tensor:
        """P(chosen > rejected) per pair: the preference oracle's, else Bradley-Terry over the two rewards. (B,)"""
        probs = []
        for r in rows:
            if r.get("preference_prob") is not None:
                probs.append(r["preference_prob"])
            elif r.get("chosen_reward") is not None and r.get("rejected_reward") is not None:
                probs.append(bradley_terry_probability(torch.tensor(r["chosen_reward"]),
                                                       torch.tensor(r["rejected_reward"])).item())
            else:
                raise ValueError("pair_labels 'expected' needs each pair's preference probability or both rewards; "
                                 f"a pair of round {r.get('round', '?')} has neither: set pair_labels: drawn")
        return torch.tensor(probs)

    def _round_metrics(self, rows, train_rows, losses, margins) -> dict[str, float]:
        metrics = {
            "loss": sum(losses) / max(len(losses), 1),
            "pairs_collected": sum(not r["tie"] for r in rows),
            "pairs_trained": len(train_rows),
            "rewards/margins": sum(margins) / max(len(margins), 1),
            "rewards/accuracies": sum(m > 0 for m in margins) / max(len(margins), 1),
            "oracle_queries": sum(r["oracle_queries"] for r in rows),
        }
        if rows:  # with importance_correction, weighted toward the training policy (klalign.ops.importance)
            metrics["kl_k1"] = sum(r["main_kl_k1"] for r in rows) / len(rows)
            metrics["kl_k3"] = sum(r["main_kl_k3"] for r in rows) / len(rows)
            metrics.update(mismatch_metrics(rows, prefix="main_", cap=self.args.importance_cap))
        rewards = [r["main_reward"] for r in rows if r["main_reward"] is not None]
        if rewards:
            metrics["main_reward"] = sum(rewards) / len(rewards)
        return metrics
