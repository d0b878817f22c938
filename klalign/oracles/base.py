"""Oracles: where feedback comes from.

Two kinds, one small interface each, both batched:

- a `RewardOracle` scores responses: `score(prompts, responses) -> (N,)` float tensor;
- a `PreferenceOracle` compares two responses to the same prompt:
  `preference(prompts, responses_a, responses_b) -> (N,)` probabilities that A beats B.

Every oracle's output goes through `check_scores`, so a NaN, an infinity or a wrong count
fails loudly with the oracle's name and the offending example instead of poisoning training.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from klalign.errors import OracleError


def check_scores(
    name: str,
    scores,
    prompts: Sequence[str],
    responses: Sequence[str],
    low: float | None = None,
    high: float | None = None,
) -> torch.Tensor:
    """Return `scores` as a float64 (N,) tensor, or raise `OracleError` naming the oracle and example."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if scores.numel() != len(responses):
        raise OracleError(
            f"oracle {name!r} returned {scores.numel()} scores for {len(responses)} responses"
        )
    bad = ~torch.isfinite(scores)
    if low is not None:
        bad |= scores < low
    if high is not None:
        bad |= scores > high
    if bad.any():
        i = int(bad.nonzero()[0])
        raise OracleError(
            f"oracle {name!r} returned {scores[i].item()} for example {i} "
            f"(prompt={prompts[i]!r}, response={responses[i]!r})"
            + ("" if low is None else f"; expected a value in [{low}, {high}]")
        )
    return scores


class RewardOracle:
    """Scores (prompt, response) pairs. Subclasses implement `_score`.

    `reproducible`: the same query, asked again under the online loop's seeding, gets the same answer
    (a resumed run may then re-ask a query whose stored answer was lost). `fingerprint()` identifies
    the oracle in a run's manifest (`klalign.runs.manifest`)."""

    name = "reward"
    reproducible = True

    def fingerprint(self) -> str:
        return self.name

    def prepare(self, accelerator=None, device=None):
        """Ready the oracle's models for inference: on a trainer's accelerator (DeepSpeed-wrapped when it
        runs DeepSpeed: every process must then call the oracle equally often), or whole on `device`
        (default: this process's). A function needs nothing. Returns the oracle."""
        return self

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """(N,) float64 rewards, validated."""
        if len(prompts) != len(responses):
            raise OracleError(f"oracle {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        return check_scores(self.name, self._score(list(prompts), list(responses)), prompts, responses)

    def _score(self, prompts: list[str], responses: list[str]):
        raise NotImplementedError


class PreferenceOracle:
    """Gives P(response A beats response B | prompt). Subclasses implement `_preference`. `reproducible`
    and `fingerprint()` as for `RewardOracle`."""

    name = "preference"
    reproducible = True

    def fingerprint(self) -> str:
        return self.name

    def prepare(self, accelerator=None, device=None):
        """As `RewardOracle.prepare`."""
        return self

    def preference(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> torch.Tensor:
        """(N,) float64 probabilities in [0, 1], validated."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise OracleError(
                f"oracle {self.name!r}: {len(prompts)} prompts, {len(responses_a)} A responses, "
                f"{len(responses_b)} B responses"
            )
        probs = self._preference(list(prompts), list(responses_a), list(responses_b))
        return check_scores(self.name, probs, prompts, responses_a, low=0.0, high=1.0)

    def _preference(self, prompts: list[str], responses_a: list[str], responses_b: list[str]):
        raise NotImplementedError


class CallableReward(RewardOracle):
    """A Python function as a reward: `fn(prompts, responses) -> list/tensor of N floats`."""

    def __init__(self, fn: Callable, name: str | None = None, reproducible: bool = True):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")
        self.reproducible = reproducible

    def _score(self, prompts, responses):
        return self.fn(prompts, responses)


class BradleyTerryPreference(PreferenceOracle):
    """Bradley-Terry preferences from a reward: P(A > B) = sigmoid((r(A) - r(B)) / temperature)."""

    def __init__(self, reward: RewardOracle, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.reward = reward
        self.temperature = temperature
        self.name = f"bradley_terry({reward.name})"
        self.reproducible = reward.reproducible  # labels are drawn from the loop's seeded generator

    def fingerprint(self) -> str:
        return f"bradley_terry({self.reward.fingerprint()}, temperature={self.temperature})"

    def prepare(self, accelerator=None, device=None):
        self.reward.prepare(accelerator, device)
        return self

    def _preference(self, prompts, responses_a, responses_b):
        ra = self.reward.score(prompts, responses_a)
        rb = self.reward.score(prompts, responses_b)
        return torch.sigmoid((ra - rb) / self.temperature)


def sample_preference_labels(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw labels 1 (A wins) / 0 (B wins) from preference probabilities. (N,) -> (N,) long."""
    return torch.bernoulli(probs.to(torch.float64), generator=generator).long()
