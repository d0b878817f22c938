"""Nash Mirror Prox and its baselines on the online loop (Tiapkin et al. 2025; ALGORITHMS.md section 3).

The regularised preference game `P_beta(pi > pi') = P(pi > pi') - beta KL(pi||pi_ref) + beta KL(pi'||pi_ref)`
has a unique symmetric equilibrium pi*. One round of the online loop is one iteration k. Each prox
step approximately solves, by M stochastic policy-gradient steps from theta_k,

    L(theta) = -E_{y ~ pi_theta, y' ~ opponent}[P(y > y')] + beta KL(pi_theta||pi_ref) + c KL(pi_theta||pi_k)

(the approximate Nash-MP of Tiapkin et al. 2025: prox steps estimated by stochastic policy
gradient), whose exact solution is the prox step of ALGORITHMS.md section 3. `method` selects the iteration:

- nash_mp:        half step, opponent pi_k, gives pi_{k+1/2}; full step, again from theta_k, with
                  opponent pi_{k+1/2}, gives pi_{k+1}. c = 1/eta. Two prox steps per iteration.
- mirror_descent: the full step alone, opponent pi_k. c = 1/eta.
- nash_md:        Munos et al. 2023: one step anchored at the geometric mixture
                  mu_k ∝ pi_k^(1-eta beta) pi_ref^(eta beta), which is also the opponent. Since
                  KL(pi||mu_k) = (1 - eta beta) KL(pi||pi_k) + eta beta KL(pi||pi_ref) + const, this is L
                  with opponent mu_k (sampled token by token, `klalign.geometric_mixture`) and
                  c = 1/eta - beta; it is exact on a single token.

Gradient estimator (one optimizer step per inner step, on fresh samples from pi_theta):
- preference: REINFORCE with the baseline 1/2, `-(P(y > y') - 1/2) * grad log pi_theta(y)`, where
  P(y > y') is the oracle's probability (or a 0/1 label drawn from it, `sample_labels`);
- each KL(pi_theta||q): per-token log-ratios l_t = log pi_theta(y_t|.) - log q(y_t|.) and the
  score function with their reward-to-go, `sum_t grad log pi_theta(y_t|.) * sum_{t'>=t} l_t'`:
  unbiased for the sequence-level KL gradient (the E[grad l_t] term is zero), and exactly the k2
  gradient on one token.
Sampling must be on-policy: temperature 1 and top_p 1 are required.

Snapshots. theta_k (the anchor and the half step's opponent) and theta_{k+1/2} are copies of the
trainable parameters held in memory: with LoRA the adapter only (the base weights are shared, and
the reference is the disabled adapter), otherwise all weights. Peak extra memory is three copies of
the trainable parameters (theta_k, theta_{k+1/2}, and the current iterate while an opponent is
swapped in) plus the frozen reference when fine-tuning fully. To sample the opponent or read pi_k's
log-probs the snapshot is swapped into the policy, so generation takes the policy's usual path
(ZeRO-3 parameters are gathered for the swap). Under DeepSpeed with bf16 (or fp16) the optimizer
keeps fp32 master weights: theta_k's masters are kept too (`klalign.snapshots`), and the full step
restarts from them exactly, so updates below half a bf16 ulp survive the reset. Nothing is written
to disk: a resumed round restarts from its checkpoint (theta_k) and replays every inner step from
the stored samples.

Optimizer. Each prox step is a new problem started from theta_k: the optimizer's state (Adam's
moments and step count) is cleared at the start of every prox step, for every method, so the full
step does not inherit moments of the half step's objective. `anneal_prox_steps`
decays the step size within every prox step (a constant one leaves the prox solution a noise floor).

Rows. Every inner step's pairs are a collection chunk of the round (`OnlineTrainer.collected`):
stored as they are queried, reused on resume. The first inner step's samples, drawn while the
policy is still pi_k, are the round's `collect`. After the iteration, fresh samples of pi_{k+1}
are compared with pi_ref and pi_k (win rates; their queries are counted apart from training's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.utils import logging

from klalign.feedback import stored_prompt
from klalign.generation import Completion, gathered_for_generation, stop_token_ids
from klalign.importance import mismatch_metrics, sample_statistics, truncated_weights
from klalign.geometric_mixture import sample_geometric_mixture
from klalign.logprobs import kl_k3, token_logprobs
from klalign.online import OnlineConfig, OnlineTrainer
from klalign.seeding import derived_seed
from klalign.oracles import PreferenceOracle
from klalign.snapshots import master_weights, reset, swapped, take_snapshot

logger = logging.get_logger(__name__)

METHODS = ("nash_mp", "mirror_descent", "nash_md")


@dataclass
class NashMPConfig(OnlineConfig):
    """Nash-MP / mirror descent / Nash-MD settings (plus OnlineConfig and TrainingArguments)."""

    method: str = field(default="nash_mp", metadata={"help": f"The iteration, one of {list(METHODS)}."})
    eta: float = field(
        default=2.0, metadata={"help": "Prox step size eta (Tiapkin et al.: eta = 2); Nash-MD needs eta * beta <= 1."}
    )
    inner_steps: int = field(default=4, metadata={"help": "M: policy-gradient steps that solve each prox step."})
    samples_per_prompt: int = field(
        default=2, metadata={"help": "Pairs (y ~ pi_theta, y' ~ opponent) per prompt in every inner step."}
    )
    sample_labels: bool = field(
        default=False, metadata={"help": "Train on 0/1 labels drawn from P(y > y') instead of the probability."}
    )
    win_rate_prompts: int = field(
        default=16, metadata={"help": "Prompts per round for the win rates of pi_{k+1} vs pi_ref and pi_k (0: none)."}
    )
    win_rate_samples: int = field(default=1, metadata={"help": "Samples per win-rate prompt (2 queries each)."})
    anneal_prox_steps: bool = field(
        default=False,
        metadata={"help": "Cosine-decay the learning rate within every prox step, restarting at the next one "
                          "(replaces lr_scheduler_type): a prox step is a stochastic optimisation, and a constant "
                          "step size leaves it a noise floor."},
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if self.method == "nash_md" and self.eta * self.beta > 1:
            raise ValueError(f"nash_md needs eta * beta <= 1 for its mixture, got {self.eta * self.beta:.3g}")
        for name in ("inner_steps", "samples_per_prompt", "win_rate_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.win_rate_prompts < 0:
            raise ValueError(f"win_rate_prompts must be >= 0, got {self.win_rate_prompts}")
        super().__post_init__()

    on_policy = True  # REINFORCE needs samples of pi_theta itself

    def equal_work_counts(self) -> dict[str, int]:
        return {**super().equal_work_counts(), "win_rate_prompts": self.win_rate_prompts}

    @property
    def prox_steps(self) -> tuple[str, ...]:
        """Names of the prox steps of one iteration."""
        return ("half", "full") if self.method == "nash_mp" else ("full",)

    @property
    def anchor_coef(self) -> float:
        """c, the weight of KL(pi_theta||pi_k) in the prox loss (see the module docstring)."""
        return 1 / self.eta - (self.beta if self.method == "nash_md" else 0.0)


def _reward_to_go(x: torch.Tensor) -> torch.Tensor:
    """sum_{t' >= t} x[:, t']. (B, T) -> (B, T)"""
    return x.flip(1).cumsum(1).flip(1)


class NashMPTrainer(OnlineTrainer):
    """Approximate Nash Mirror Prox (and mirror descent, Nash-MD) with a pairwise preference oracle.

    Arguments as `OnlineTrainer`, plus `eval_dataset`: prompts for the win rates (default: the
    training prompts).
    """

    oracle_kind = (PreferenceOracle,)

    def __init__(self, model, ref_model=None, args: NashMPConfig | None = None, train_dataset=None,
                 processing_class=None, oracle=None, peft_config=None, callbacks=None, eval_dataset=None):
        if not isinstance(args, NashMPConfig):
            raise TypeError(f"args must be a NashMPConfig, got {type(args).__name__}")
        super().__init__(model, ref_model, args, train_dataset, processing_class, oracle, peft_config, callbacks)
        self.win_rate_pool = self.prompts if eval_dataset is None else list(eval_dataset["prompt"])
        self._mismatch: list[dict] = []  # the round's sampler/learner mismatch, per sample (klalign.importance)
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
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _chunks_per_step(self) -> int:
        return math.ceil(self.args.prompts_per_round / self.args.prompts_per_chunk)

    @property
    def _policy(self):
        """The unwrapped policy (the Trainer keeps it as `model` beside `model_wrapped`)."""
        return self.model

    # ---- collect: the first inner step's pairs (the policy is still pi_k) ----

    def collect(self, round_index: int, prompts: list) -> list[dict]:
        return self._sample_pairs(prompts, step=0, opponent=None)

    def _sample_pairs(self, prompts: list, step: int, opponent: dict | None, opponent_key=None) -> list[dict]:
        """y ~ pi_theta and y' ~ the opponent, `samples_per_prompt` pairs per prompt, and P(y > y').

        `opponent_key` names the opponent's weights for a vLLM engine (None: the current policy)."""
        n = self.args.samples_per_prompt
        ours = [c for per_prompt in self.generate(prompts, n) for c in per_prompt]
        with swapped(self._policy, opponent):  # opponent None: pi_k is the current policy (step 0)
            theirs = [c for per_prompt in self._opponent_samples(prompts, n, opponent_key) for c in per_prompt]
        pair_prompts = [c.prompt for c in ours]
        probs = self.oracle.preference(pair_prompts, [c.text for c in ours], [c.text for c in theirs])  # (N,)
        labels = torch.bernoulli(probs) if self.args.sample_labels else probs
        phase, inner = divmod(step, self.args.inner_steps)
        name = self.args.prox_steps[phase]
        opponent_name = {"nash_md": "mixture(pi_k, pi_ref)", "mirror_descent": "pi_k"}.get(
            self.args.method, "pi_k" if name == "half" else "pi_k+1/2")
        return [
            {"prompt": stored_prompt(y.prompt), "prompt_ids": y.prompt_ids, "completion_ids": y.completion_ids,
             "completion": y.text, "opponent": o.text, "preference_prob": p, "label": label,
             "prox_step": name, "inner_step": inner, "opponent_policy": opponent_name, "oracle_queries": 1,
             "sampler_logprobs": y.sampler_logprobs}
            for y, o, p, label in zip(ours, theirs, probs.tolist(), labels.tolist())
        ]

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

    # ---- update: the prox steps ----

    def update(self, round_index: int, rows: list[dict]) -> dict[str, float]:
        engine = self.model_wrapped if self.is_deepspeed_enabled else None
        anchor = take_snapshot(self._policy)  # theta_k as the model computes with it: pi_k, swapped in
        start = take_snapshot(self._policy, engine) if master_weights(engine) else anchor  # fp32 masters
        metrics: dict[str, float] = {}
        opponent, queries = anchor, 0
        for phase, name in enumerate(self.args.prox_steps):
            if phase > 0:  # Nash-MP's full step: opponent pi_{k+1/2}, restart from theta_k
                opponent = take_snapshot(self._policy)
                reset(self._policy, start, engine)
                self.weights_changed()
            stats, used = self._prox_step(round_index, phase, rows if phase == 0 else None, anchor, opponent)
            metrics.update({f"{name}/{k}": v for k, v in stats.items()})
            queries += used
        metrics["loss"] = metrics["full/prox_loss"]
        metrics.update(mismatch_metrics(self._mismatch))
        self._mismatch = []
        metrics.update(self._query_counts("preference_queries", queries))
        metrics.update(self._win_rates(round_index, anchor))
        return metrics

    def _prox_step(self, round_index: int, phase: int, first_rows, anchor: dict, opponent: dict):
        """M policy-gradient steps on L(theta) from the current parameters (theta_k).

        Returns the statistics averaged over the steps and the preference queries the steps used."""
        self._fresh_optimizer_state()
        rank, world = self.args.process_index, self.args.world_size
        prompts = self.round_prompts(round_index)  # the prox problem's prompts, the round's collection
        totals: dict[str, float] = {}
        queries = 0
        for inner in range(self.args.inner_steps):
            step = phase * self.args.inner_steps + inner
            rows = first_rows if step == 0 else self._step_rows(round_index, step, prompts, opponent)
            queries += sum(r["oracle_queries"] for r in rows)  # rows of every process
            loss, stats = self._policy_gradient_loss(rows[rank::world], None if inner == 0 else anchor)
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
            chunk_index = step * self._chunks_per_step() + j
            key = ("opponent", round_index, step // self.args.inner_steps)  # pi_k or pi_k+1/2 of this round
            rows += self.collected(round_index, chunk_index, lambda: self._sample_pairs(chunk, step, opponent, key))
        return rows

    def _policy_gradient_loss(self, rows: list[dict], anchor: dict | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The surrogate whose gradient estimates grad L(theta) (module docstring), and L's estimate.

        `anchor` None: theta is theta_k itself (an inner step 0), so the log-ratios to pi_k are zero."""
        batch = self.batch([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows])
        mask = batch["completion_mask"][:, 1:].float()  # (B, T-1): token t+1 is scored at t
        ref_logps = self.reference.token_logprobs(self.model_wrapped, batch)  # (B, T-1)
        anchor_logps = None
        if anchor is not None:
            with torch.no_grad(), swapped(self._policy, anchor):
                anchor_logps = token_logprobs(self.model_wrapped, **batch)  # (B, T-1) under pi_k
        logps = token_logprobs(self.model_wrapped, **batch)  # (B, T-1), with gradients
        if anchor_logps is None:
            anchor_logps = logps.detach()
        kl_ref = (logps.detach() - ref_logps) * mask  # (B, T-1) per-token log-ratios
        kl_anchor = (logps.detach() - anchor_logps) * mask
        win = torch.tensor([r["label"] for r in rows], dtype=logps.dtype, device=logps.device)  # (B,)
        advantage = ((win - 0.5)[:, None] - self.args.beta * _reward_to_go(kl_ref)
                     - self.args.anchor_coef * _reward_to_go(kl_anchor))  # (B, T-1)
        weights = self._importance_weights(rows, logps.detach(), batch)  # (B,): 1 without correction
        surrogate = -(weights[:, None] * advantage * logps * mask).sum(1).mean()
        # Means over every process's rows (k1 estimates of the KLs): L's estimate and its parts.
        parts = torch.stack([win.mean(), kl_ref.sum(1).mean(), kl_anchor.sum(1).mean()])  # (3,)
        win_rate, kl_ref_seq, kl_anchor_seq = self.accelerator.reduce(parts, "mean").tolist()
        stats = {
            "prox_loss": -win_rate + self.args.beta * kl_ref_seq + self.args.anchor_coef * kl_anchor_seq,
            "win_rate_vs_opponent": win_rate,
            "kl_ref": kl_ref_seq,
            "kl_anchor": kl_anchor_seq,
        }
        return surrogate, stats


    def _fresh_optimizer_state(self) -> None:
        """Clear the moments and step counts, under accelerate's and DeepSpeed's wrappers."""
        optimizer = self.optimizer
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        optimizer.state.clear()  # torch optimizers (and DeepSpeed's) rebuild the state on their next step
        for group in optimizer.param_groups:
            if "step" in group:  # fused Adams count steps per group
                group["step"] = 0

    def _importance_weights(self, rows: list[dict], logps: torch.Tensor, batch: dict) -> torch.Tensor:
        """Truncated importance weights of the rows' samples toward pi_theta (klalign.importance), and the
        sampler/learner mismatch of the step recorded for the round's metrics. (B,)"""
        sampled = sample_statistics(logps, batch["completion_mask"],
                                    [Completion(None, [], [], "", r.get("sampler_logprobs")) for r in rows])
        self._mismatch += [x for x in sampled if x["mismatch_sum"] is not None]
        ones = torch.ones(len(rows), dtype=logps.dtype, device=logps.device)
        if self.args.importance_correction == "none" or any(x["sampler_logprob"] is None for x in sampled):
            return ones
        sampler = torch.tensor([x["sampler_logprob"] for x in sampled], dtype=logps.dtype, device=logps.device)
        return truncated_weights(logps.sum(dim=1), sampler, self.args.importance_cap)

    # ---- metrics ----

    def _query_counts(self, name: str, this_round: int) -> dict[str, float]:
        """This round's count and the running total (from the logged history, so resume continues it)."""
        before = next((h[name] for h in reversed(self.state.log_history) if name in h), 0)
        return {name: before + this_round, f"{name}_round": this_round}

    def _win_rates(self, round_index: int, anchor: dict) -> dict[str, float]:
        """Win rates of pi_{k+1} against pi_ref and pi_k on fresh samples, and KL(pi_{k+1}||pi_ref)."""
        if self.args.win_rate_prompts == 0:
            return {}
        rng = np.random.default_rng(derived_seed(self.args.seed, round_index, "win_rate_prompts"))
        n = self.args.win_rate_prompts
        pool = self.win_rate_pool
        prompts = [pool[i] for i in rng.choice(len(pool), n, replace=n > len(pool))]
        rank, world, size = self.args.process_index, self.args.world_size, self.args.prompts_per_chunk
        first_chunk = self.steps_per_round() * self._chunks_per_step()
        rows = []
        for j, start in enumerate(range(0, n, size)):
            chunk = prompts[start : start + size][rank::world]
            rows += self.collected(round_index, first_chunk + j, lambda: self._win_rate_rows(chunk, anchor))
        vs_ref = torch.tensor([r["win_vs_reference"] for r in rows], dtype=torch.float64)
        vs_prev = torch.tensor([r["win_vs_previous"] for r in rows], dtype=torch.float64)
        logratio = torch.tensor([r["logratio"] for r in rows], dtype=torch.float64)
        sem = lambda x: (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else float("nan")
        return {
            "win_rate/vs_reference": vs_ref.mean().item(), "win_rate/vs_reference_sem": sem(vs_ref),
            "win_rate/vs_previous": vs_prev.mean().item(), "win_rate/vs_previous_sem": sem(vs_prev),
            "kl_k1": logratio.mean().item(), "kl_k3": kl_k3(logratio).mean().item(),
            **self._query_counts("eval_queries", sum(r["oracle_queries"] for r in rows)),
        }

    def _win_rate_rows(self, prompts: list, anchor: dict) -> list[dict]:
        n = self.args.win_rate_samples
        ours = [c for per_prompt in self.generate(prompts, n) for c in per_prompt]
        refs = self.generate_reference(prompts, n)
        with swapped(self._policy, anchor):
            previous = self.generate(prompts, n, weights=("pi_k", self.state.global_step))
        refs, previous = [c for p in refs for c in p], [c for p in previous for c in p]
        texts = [c.prompt for c in ours]
        vs_ref = self.oracle.preference(texts, [c.text for c in ours], [c.text for c in refs])  # (N,)
        vs_prev = self.oracle.preference(texts, [c.text for c in ours], [c.text for c in previous])  # (N,)
        batch = self.batch([c.prompt_ids for c in ours], [c.completion_ids for c in ours])
        logratio = self.frozen_policy_logprobs(batch) - self.reference_logprobs(batch)  # (N,)
        return [
            {"prompt": stored_prompt(y.prompt), "completion": y.text, "reference_completion": r.text,
             "previous_completion": q.text, "win_vs_reference": a, "win_vs_previous": b, "logratio": lr,
             "oracle_queries": 2}
            for y, r, q, a, b, lr in zip(ours, refs, previous, vs_ref.tolist(), vs_prev.tolist(), logratio.tolist())
        ]
