"""Seeds derived from what a draw is for, never from the history of a run: a resumed run, a run on
another number of processes, and an uninterrupted run draw the same samples."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derived_seed(*parts) -> int:
    """A 31-bit seed from any parts: the same parts give the same seed in every run and process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
