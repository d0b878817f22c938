"""Best-of-N sampling, as a data source, and its reward/KL curve estimated from samples.

ALGORITHMS.md section 4 (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
policy"; Yang et al. 2024, "Asymptotics of language model alignment"): draw N responses from a
policy, keep the one with the highest reward.

- `BestOfNSampler` draws N responses per prompt (in generation batches, so N may exceed one batch),
  scores them with any `RewardOracle`, and returns, or appends to a JSONL file prompt by prompt, the
  best response and every score. A re-run on the same file skips the prompts already there.
- `distillation_dataset` / `preference_dataset` turn its results into training data: best-of-N
  distillation (prompt/completion) and best-vs-worst pairs (prompt/chosen/rejected).
- `best_of_n_expectation` and friends estimate the best-of-N curve from n >= N samples per prompt
  without drawing anything new: an unbiased U-statistic over all N-subsets of the n samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

import klalign
from klalign.data.prompts import as_turn, prompt_key
from klalign.generation.sample import sample_completions
from klalign.generation.types import Completion, GenerationArguments
from klalign.models.placement import decided_on_main
from klalign.oracles.base import RewardOracle
from klalign.runs.manifest import check_or_write, model_fingerprint
from klalign.runs.prompt_jobs import (
    append_lines,
    prompt_groups,
    read_jsonl,
    run_groups,
    unique_prompts,
)
from klalign.runs.seeding import derived_seed
from klalign.theory import (
    best_of_n_distribution,
    best_of_n_kl,
    best_of_n_kl_bound,
    best_of_n_kl_estimate,
)


def sample_and_score(
    model, tokenizer, oracle: RewardOracle, prompts: list, num_samples: int,
    generation: GenerationArguments | None = None, seed: int | None = None, accelerator=None, progress: bool = False,
    engine=None, weights_key=None, sampler_logprobs: bool = False,
) -> tuple[list[list[Completion]], torch.Tensor]:
    """`num_samples` completions per prompt and their rewards: (completions, (P, n) float64 scores).

    Generation is batched over the flat list of P * n sequences (`generation_batch_size` at a
    time), so n larger than a batch is simply split across generate() calls; with a vLLM `engine`
    (and `model`'s weights pushed under `weights_key`), vLLM batches them. The oracle sees each
    prompt as given (a string or a conversation) and is called once for all P * n responses.
    `sampler_logprobs`: each completion carries the sampler's log-probs of its tokens (`sample_completions`).
    """
    completions = sample_completions(model, tokenizer, prompts, num_samples, generation, seed, accelerator, progress,
                                     engine=engine, weights_key=weights_key, sampler_logprobs=sampler_logprobs)
    flat = [c for per_prompt in completions for c in per_prompt]
    scores = oracle.score([c.prompt for c in flat], [c.text for c in flat])  # (P * n,)
    return completions, scores.view(len(prompts), num_samples)


# ----------------------------------------------------------------------------- the sampler


@dataclass
class BestOfNResult:
    """One prompt's N responses and their scores; `best_index` is the argmax (first among ties)."""

    prompt: object  # str or list of messages
    responses: list[str]
    scores: list[float]

    @property
    def best_index(self) -> int:
        return int(np.argmax(self.scores))

    @property
    def worst_index(self) -> int:
        return int(np.argmin(self.scores))

    @property
    def best(self) -> str:
        return self.responses[self.best_index]

    @property
    def best_score(self) -> float:
        return self.scores[self.best_index]

    def to_record(self) -> dict:
        """The JSONL row: the fields, plus the best response and its index for readers of the file."""
        return {**asdict(self), "best_index": self.best_index, "best": self.best, "best_score": self.best_score}

    @classmethod
    def from_record(cls, record: dict) -> BestOfNResult:
        return cls(record["prompt"], record["responses"], record["scores"])


def read_best_of_n(path: str | Path) -> list[BestOfNResult]:
    """The results a `BestOfNSampler` appended to `path`, in file order.

    A run killed mid-write leaves a torn last line: it is dropped from the file (that prompt is
    sampled again, with the same seed), so the file stays valid JSONL for every other reader.
    """
    return [BestOfNResult.from_record(r) for r in read_jsonl(Path(path))]


class BestOfNSampler:
    """Best-of-N responses for prompts from `model`, scored by `oracle` (reward model or callable).

        sampler = BestOfNSampler(model, tokenizer, build_reward_oracle("vader"), n=16)
        results = sampler.sample(prompts, output_path="runs/bon/best_of_16.jsonl")
        preference_dataset(results).to_json("runs/bon/pairs.jsonl")

    Prompts are grouped so that one generate() call holds about `generation_batch_size` sequences
    (several prompts when N is small; one prompt over several calls when N is large), and each
    group is drawn with a seed derived from `seed` and its prompts (`klalign.runs.prompt_jobs`): the
    results do not depend on what ran before, so a killed and resumed run writes the same file as
    an uninterrupted one. With `output_path`, each prompt's result is appended as soon as it is
    scored, and prompts already in the file are not sampled again. Under a multi-process launch
    every process calls `sample` with the same prompts; the groups are spread over the processes
    and the main process writes (every process returns all results).
    """

    def __init__(
        self, model, tokenizer, oracle: RewardOracle, n: int = 4, generation: GenerationArguments | None = None,
        seed: int = 0, accelerator=None, progress: bool = True,
    ):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.model, self.tokenizer, self.oracle, self.n = model, tokenizer, oracle, n
        self.generation = generation or GenerationArguments()
        self.seed, self.accelerator, self.progress = seed, accelerator, progress
        self.engine = None  # generation_backend: vllm: this process's engine, built on first use

    def _check_manifest(self, path: Path) -> None:
        """Same settings draw the same samples: a re-run continues the file; other settings never may."""
        settings = {"klalign_version": klalign.__version__, "model": model_fingerprint(self.model), "n": self.n,
                    "oracle": self.oracle.fingerprint(), "seed": self.seed,
                    "generation": dataclasses.asdict(self.generation)}
        check_or_write(path.with_name(f"{path.stem}.manifest.json"), settings, path.exists(), True,
                       "the best-of-N results file")

    def sample(self, prompts: list, output_path: str | Path | None = None) -> list[BestOfNResult]:
        """One `BestOfNResult` per prompt, in prompt order (read from `output_path` where already done)."""
        path = Path(output_path) if output_path is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            decided_on_main(lambda: self._check_manifest(path))
        done = decided_on_main(lambda: {prompt_key(r.prompt): r for r in read_best_of_n(path)} if path else {})
        unique = unique_prompts(prompts)
        groups = prompt_groups(list(unique), self.generation.generation_batch_size // self.n)
        todo = [g for g in groups if any(key not in done for key in g)]

        if self.generation.generation_backend == "vllm" and self.engine is None:
            from klalign.generation.vllm_engine import engine_for

            self.engine = engine_for(self.model, self.tokenizer, self.generation, self.seed)

        def work(keys: list[str]) -> list[BestOfNResult]:
            group = [unique[k] for k in keys]
            completions, scores = sample_and_score(
                self.model, self.tokenizer, self.oracle, group, self.n, self.generation,
                seed=derived_seed(self.seed, "best_of_n", *keys), accelerator=self.accelerator,
                engine=self.engine, weights_key="model",
            )
            return [BestOfNResult(p, [c.text for c in cs], row) for p, cs, row in zip(group, completions, scores.tolist())]

        def write(keys: list[str], results: list[BestOfNResult]) -> None:
            new = [(k, r) for k, r in zip(keys, results) if k not in done]
            if path is not None:
                append_lines(path, [json.dumps(r.to_record()) for _, r in new])
            done.update(new)

        run_groups(todo, work, write, desc=f"best-of-{self.n}", progress=self.progress)
        done = decided_on_main(lambda: done)
        return [done[prompt_key(p)] for p in prompts]


# ----------------------------------------------------------------------------- as training data


def distillation_dataset(results: list[BestOfNResult]) -> Dataset:
    """Best-of-N distillation data: "prompt", "completion" (the best response), "score".

    TRL's prompt-completion format (conversational prompts get an assistant-message completion);
    SFT on it is the usual way to distil best-of-N into the policy.
    """
    return Dataset.from_list([
        {"prompt": r.prompt, "completion": as_turn(r.prompt, r.best), "score": r.best_score} for r in results
    ])


def preference_dataset(results: list[BestOfNResult], min_margin: float = 0.0) -> Dataset:
    """Best-vs-worst pairs: "prompt", "chosen", "rejected", "chosen_score", "rejected_score".

    Prompts whose best and worst scores differ by `min_margin` or less carry no preference and are
    left out. Readable by `klalign.data.datasets.load_preference_dataset` once written with `.to_json(path)`.
    """
    rows = []
    for r in results:
        best, worst = r.best_index, r.worst_index
        if r.scores[best] - r.scores[worst] <= min_margin:
            continue
        rows.append({
            "prompt": r.prompt,
            "chosen": as_turn(r.prompt, r.responses[best]),
            "rejected": as_turn(r.prompt, r.responses[worst]),
            "chosen_score": r.scores[best],
            "rejected_score": r.scores[worst],
        })
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------- the curve, from samples


def best_of_n_weights(num_samples: int, n: int) -> np.ndarray:
    """w[k] = P(the (k+1)-th smallest of n samples is the best of a uniform random N-subset). (n,)

    = C(k, N-1) / C(n, N) for k >= N-1, else 0. Exact integer binomials, so large n is fine.
    """
    if not 1 <= n <= num_samples:
        raise ValueError(f"best-of-{n} needs 1 <= N <= {num_samples} samples")
    total = math.comb(num_samples, n)
    return np.array([math.comb(k, n - 1) / total for k in range(num_samples)])


def best_of_n_expectation(rewards: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """E[value of the best of N] per prompt, averaged over all N-subsets of the samples. (P, m) -> (P,)

    The U-statistic: an unbiased estimate of E[value(Y_N)], Y_N the best of N fresh draws, from
    m >= N draws. `values` must be constant within a reward level (as the reward itself and
    Beirami's D(eps) with a level mass eps are), so the order among tied samples does not matter.
    """
    order = np.argsort(rewards, axis=-1, kind="stable")  # (P, m) ascending reward
    ranked = np.take_along_axis(values, order, axis=-1)
    return ranked @ best_of_n_weights(rewards.shape[-1], n)


def jackknife_se(rewards: np.ndarray, values: np.ndarray, n: int) -> float:
    """Standard error of the prompt mean of `best_of_n_expectation`, by delete-one jackknife.

    Within each prompt (Arvesen 1969 for U-statistics), conditional on the prompts:
    var_i = (m-1)/m * sum_j (u_{-j} - mean u_{-j})^2, se = sqrt(sum_i var_i) / P. NaN when N = m
    (no leave-one-out subset holds N samples).
    """
    P, m = rewards.shape
    if n >= m:
        return float("nan")
    keep = ~np.eye(m, dtype=bool)  # row j leaves sample j out
    loo = np.stack([best_of_n_expectation(rewards[:, k], values[:, k], n) for k in keep], axis=1)  # (P, m)
    var = (m - 1) / m * ((loo - loo.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)  # (P,)
    return float(np.sqrt(var.sum()) / P)


def level_mass(rewards: np.ndarray, ref_logprobs: np.ndarray, completion_ids: list[list[tuple]]) -> np.ndarray:
    """eps for Beirami's estimator: the reference's mass of each sample's reward level. (P, m)

    KL(pi_N || p) only depends on the law of the reward level (pi_N / p is constant on a level), so
    eps is the level's mass. When every sample at a level is the same response (continuous rewards,
    or the same token repeated), eps = p_ref(y), exact from the reference's sequence log-prob. When
    distinct responses tie (a reward with atoms, e.g. VADER's 0.0 for neutral text), the mass of the
    level is far above any one response's, and its empirical frequency among the m samples is used.
    """
    eps = np.maximum(np.exp(ref_logprobs), np.finfo(np.float64).tiny)  # (P, m); log-probs of -800 underflow
    for i, row in enumerate(rewards):
        for level in np.unique(row):
            at = np.flatnonzero(row == level)
            if len({completion_ids[i][j] for j in at}) > 1:
                eps[i, at] = len(at) / len(row)
    return np.minimum(eps, 1.0)


def best_of_n_curve(rewards: np.ndarray, eps: np.ndarray, ns: list[int]) -> list[dict]:
    """Reward (with jackknife SE) and KL of best-of-N for each N, from m reference samples per prompt.

    kl_bound = log N - (N-1)/N (Beirami et al. 2024, Thm 1); kl_estimate = E[D(eps(Y_N))], their
    estimator averaged over the best-of-N selection with the same U-statistic. (P, m) inputs.

    On the footing of the tilted frontier (`klalign.evaluation.statistics.tilted_frontier_estimate`, the exact
    tilt of the empirical law of the m samples): `reward_empirical` and `kl_empirical` are the exact reward and
    KL of best-of-N drawn from that same empirical law (ties grouped), so the two curves compare as the exact
    ones do (the tilt is on top at every KL); both saturate at log m.
    """
    empirical = np.full(rewards.shape, 1.0 / rewards.shape[1])  # (P, m): each sample's mass
    rows = []
    for n in ns:
        d = best_of_n_kl_estimate(eps, n)  # (P, m): D(eps) if that sample were selected
        rows.append({
            "n": n,
            "reward": float(best_of_n_expectation(rewards, rewards, n).mean()),
            "reward_se": jackknife_se(rewards, rewards, n),
            "kl_bound": float(best_of_n_kl_bound(n)),
            "kl_estimate": max(0.0, float(best_of_n_expectation(rewards, d, n).mean())),  # D >= 0; no -0.0
            "reward_empirical": float((best_of_n_distribution(empirical, rewards, n) * rewards).sum(-1).mean()),
            "kl_empirical": max(0.0, float(best_of_n_kl(empirical, rewards, n).mean())),
        })
    return rows
