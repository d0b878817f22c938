"""The tiny positivity task: prompts about everyday subjects, and reply pairs labelled by the VADER sentiment
reward (the same phrase bank the tiny tokenizer is trained on, `klalign.models.tiny`). The data behind
`configs/data/tiny_*.jsonl`, the DPO tests and the CPU benchmarks."""

from __future__ import annotations

import random

from klalign.models.tiny import NEGATIVE, NEUTRAL, POSITIVE, QUESTIONS, SUBJECTS
from klalign.oracles.reward_functions import vader_sentiment


def positivity_preferences(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic prompt/chosen/rejected rows for the "make replies more positive" demo.

    Each pair mixes sentiment words at random; the chosen reply is the one VADER scores higher
    (ties are resampled), so the labels are the demo's real reward, not a rule baked into the text.
    """
    rng = random.Random(seed)
    words = POSITIVE + NEGATIVE + NEUTRAL
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        subject = rng.choice(SUBJECTS)
        prompt = rng.choice(QUESTIONS).format(s=subject)
        replies = [f" I think {subject} was {rng.choice(words)} and {rng.choice(words)}." for _ in range(2)]
        scores = vader_sentiment([prompt] * 2, replies)
        if scores[0] == scores[1]:
            continue
        chosen, rejected = (replies[0], replies[1]) if scores[0] > scores[1] else (replies[1], replies[0])
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows



def positivity_prompts(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt-only rows for online methods and evaluation of the positivity demo."""
    rng = random.Random(seed)
    return [{"prompt": rng.choice(QUESTIONS).format(s=rng.choice(SUBJECTS))} for _ in range(n)]
