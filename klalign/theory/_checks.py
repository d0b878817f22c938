"""Argument validation shared by the theory modules.

Every check raises a `ValueError` that names the offending argument, so a bad call fails at
the boundary instead of returning a NaN three functions later.
"""

from __future__ import annotations

import numpy as np

PROBABILITY_ATOL = 1e-8  # how far a distribution's total may drift from 1 (rounding, not modelling)


def as_distribution(name: str, p) -> np.ndarray:
    """Float64 array of distributions over the last axis: nonnegative, finite, summing to 1."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last axis of outcomes, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} must be finite")
    if np.any(p < 0):
        raise ValueError(f"{name} has negative probabilities (min {p.min():.3g})")
    total_error = np.max(np.abs(p.sum(axis=-1) - 1.0))
    if total_error > PROBABILITY_ATOL:
        raise ValueError(f"{name} must sum to 1 over its last axis (off by {total_error:.3g})")
    return p


def as_finite(name: str, x) -> np.ndarray:
    """Float64 array with no NaN or infinity."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite")
    return x


def check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def broadcast_pair(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a and b broadcast against each other over the leading axes, with the same last axis."""
    if a.shape[-1:] != b.shape[-1:]:
        raise ValueError(f"{name_a} and {name_b} must have the same last axis, got {a.shape} and {b.shape}")
    try:
        return np.broadcast_arrays(a, b)
    except ValueError:
        raise ValueError(f"{name_a} and {name_b} do not broadcast: {a.shape} and {b.shape}") from None


def check_positive(name: str, value) -> float:
    """A strictly positive finite scalar (beta, eta, noise scales)."""
    value = np.asarray(value, dtype=np.float64)
    if value.ndim != 0 or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite scalar, got {value}")
    return float(value)


def check_nonnegative(name: str, value) -> float:
    value = np.asarray(value, dtype=np.float64)
    if value.ndim != 0 or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a nonnegative finite scalar, got {value}")
    return float(value)


def check_count(name: str, value, minimum: int) -> int:
    """An integer >= minimum (numbers of steps, rounds, tokens)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def as_sample_count(name: str, n) -> np.ndarray:
    """Best-of-N sample counts: finite and >= 1 (real N allowed, the exact law extends to it)."""
    n = np.asarray(n, dtype=np.float64)
    if not np.all(np.isfinite(n)) or np.any(n < 1):
        raise ValueError(f"{name} must be >= 1 everywhere, got min {np.min(n)}")
    return n


def as_preference_matrix(P) -> np.ndarray:
    """A (K, K) matrix of win probabilities in [0, 1] with P + P.T = 1 (so P[i, i] = 1/2)."""
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] == 0:
        raise ValueError(f"P must be a square (K, K) matrix, got shape {P.shape}")
    if not np.all(np.isfinite(P)) or np.any(P < 0) or np.any(P > 1):
        raise ValueError("P must have entries in [0, 1]")
    asymmetry = np.max(np.abs(P + P.T - 1.0))
    if asymmetry > PROBABILITY_ATOL:
        raise ValueError(f"P must satisfy P + P.T = 1 (off by {asymmetry:.3g})")
    return P
