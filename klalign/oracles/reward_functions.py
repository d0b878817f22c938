"""Reward functions usable as Python callables: `fn(prompts, responses) -> list[float]`.

Select one from a config by name (`reward_fn: vader`) or pass any callable to `CallableReward`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable


@lru_cache(maxsize=1)
def _vader():
    from vader import (
        SentimentIntensityAnalyzer,  # the `nltk-vader-sentiment` package; no downloads
    )

    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER's compound sentiment of each response, in [-1, 1]: "make replies more positive"."""
    analyzer = _vader()
    return [analyzer.polarity_scores(r)["compound"] for r in responses]


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    """Number of characters of each response (a sanity-check reward)."""
    return [float(len(r)) for r in responses]


REWARD_FUNCTIONS: dict[str, Callable[[list[str], list[str]], list[float]]] = {
    "vader": vader_sentiment,
    "length": response_length,
}


def get_reward_function(name: str) -> Callable[[list[str], list[str]], list[float]]:
    """The named reward function, or a clear error listing the names."""
    if name not in REWARD_FUNCTIONS:
        raise ValueError(f"unknown reward function {name!r}; expected one of {sorted(REWARD_FUNCTIONS)}")
    return REWARD_FUNCTIONS[name]
