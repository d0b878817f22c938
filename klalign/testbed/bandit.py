"""The single-token test bed: a real HF causal LM whose policy is an exact, known table.

Each of C prompts ("prompt 3") is answered by exactly one of K action tokens ("a5") followed
by EOS, so the policy pi(.|x) is the model's next-token distribution at the end of the prompt,
restricted to the action tokens. Every closed form in ALGORITHMS.md (tilted optimum, best-of-N
law, regularised Nash equilibrium) is exact on this contextual bandit, which is how klalign shows
that its trainers implement the papers' algorithms.

Nothing is special-cased for trainers: the model is a tiny Llama saved with `save_pretrained`, the
tokenizer a `PreTrainedTokenizerFast`, the data `datasets.Dataset`s of strings, the feedback
`klalign.oracles` oracles.

The action set is closed by construction (`closed=True`, the default): the model is a
`klalign.testbed.closed_actions.ClosedActionLlamaForCausalLM`, a registered Llama subclass whose forward pass
allows only the K actions after a prompt and only EOS after an action, so no training of any weight
can move probability off the actions (a plain Llama can: DPO is blind to a shift shared by all of a
prompt's action logits, and Adam on every weight leaked up to 0.998 of a prompt's mass to EOS; see
that module's docstring). `closed=False` builds the same weights as a plain `LlamaForCausalLM`, for
backends that only know standard architectures (vLLM); its off-action mass is then only kept small
by the fitted head, and full fine-tuning can raise it.

The tokenizer and the model (building one whose policy is `ref`, reading its exact policy) are in
`klalign.testbed.model`; their names are re-exported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from klalign.oracles.base import (
    BradleyTerryPreference,
    PreferenceOracle,
    RewardOracle,
    sample_preference_labels,
)
from klalign.testbed.model import (
    EOS,
    action_text,
    build_model,
    build_tokenizer,
    prompt_text,
)
from klalign.theory.tilt import tilt

BANDIT_FILE = "bandit.json"  # the tables, saved beside the model so the folder is self-describing


def as_policy(name: str, table) -> torch.Tensor:
    """`table` as a float64 (C, K) tensor of strictly positive rows summing to 1, or a ValueError."""
    table = torch.as_tensor(table, dtype=torch.float64)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"{name} must have shape (C, K) with K >= 2, got {tuple(table.shape)}")
    if not torch.isfinite(table).all() or (table <= 0).any():
        raise ValueError(f"{name} must be finite and strictly positive (every action needs a log-prob)")
    error = (table.sum(-1) - 1).abs().max().item()
    if error > 1e-8:
        raise ValueError(f"{name} rows must sum to 1 (off by {error:.3g})")
    return table


# ----------------------------------------------------------------------------- preferences


def bradley_terry_matrix(reward: torch.Tensor) -> torch.Tensor:
    """P[c, a, b] = sigmoid(r[c, a] - r[c, b]). (C, K) -> (C, K, K)"""
    return torch.sigmoid(reward[:, :, None] - reward[:, None, :])


def intransitive_preferences(
    num_prompts: int, num_actions: int, seed: int = 0, strength: float = 1.0, noise: float = 0.3
) -> torch.Tensor:
    """A rock-paper-scissors-like preference tensor with P + P^T = 1. (C, K, K) float64

    Action a beats the next floor((K-1)/2) actions around a circle by `strength`, plus
    antisymmetric Gaussian noise; the actions are relabelled at random per prompt. Such a
    tournament has many 3-cycles, so no action is best and the Nash equilibrium is mixed.
    """
    if num_actions < 3:
        raise ValueError(f"an intransitive preference needs >= 3 actions, got {num_actions}")
    g = torch.Generator().manual_seed(seed)
    a = torch.arange(num_actions)
    d = (a[None, :] - a[:, None]) % num_actions  # (K, K) distance from a to b around the circle
    cyclic = (2 * d < num_actions).double() * (d > 0) - (2 * d > num_actions).double()  # (K, K) antisymmetric
    G = torch.randn(num_prompts, num_actions, num_actions, generator=g, dtype=torch.float64)
    margin = (strength * cyclic + noise * (G - G.transpose(1, 2)) / 2).clamp(-1, 1)  # (C, K, K) antisymmetric
    perm = torch.stack([torch.randperm(num_actions, generator=g) for _ in range(num_prompts)])  # (C, K)
    margin = torch.stack([m[p][:, p] for m, p in zip(margin, perm)])
    return (1 + margin) / 2


# ----------------------------------------------------------------------------- the bandit


def _table(name: str, values, shape: tuple) -> torch.Tensor:
    """`values` as a finite float64 tensor of the given shape, or a ValueError naming it."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if tuple(values.shape) != tuple(shape) or not torch.isfinite(values).all():
        raise ValueError(f"{name} must be a finite tensor of shape {tuple(shape)}, got {tuple(values.shape)}")
    return values


@dataclass(eq=False)
class SingleTokenBandit:
    """A C-prompt, K-action contextual bandit and the tables that define it (all float64).

    ref: (C, K) the reference policy the model is built with.
    reward: (C, K) the reward table, or None; computed as features @ theta when those are given.
    features, theta: (C, K, d) and (d,), a linear reward (for elliptical-bonus learners).
    P: (C, K, K) P[c, a, b] = P(a beats b | prompt c), possibly intransitive; None means
       Bradley-Terry on the reward (see `preference_matrix`).
    """

    ref: torch.Tensor
    reward: torch.Tensor | None = None
    features: torch.Tensor | None = None
    theta: torch.Tensor | None = None
    P: torch.Tensor | None = None

    def __post_init__(self):
        self.ref = as_policy("ref", self.ref)
        C, K = self.ref.shape
        if (self.features is None) != (self.theta is None):
            raise ValueError("give both features (C, K, d) and theta (d,), or neither")
        if self.features is not None:
            self.features = _table("features", self.features, (C, K, len(self.theta)))
            self.theta = _table("theta", self.theta, (len(self.theta),))
            if self.reward is not None and not torch.allclose(_table("reward", self.reward, (C, K)),
                                                              self.features @ self.theta):
                raise ValueError("reward disagrees with features @ theta")
            self.reward = self.features @ self.theta  # (C, K)
        if self.reward is not None:
            self.reward = _table("reward", self.reward, (C, K))
        if self.P is not None:
            self.P = _table("P", self.P, (C, K, K))
            if (self.P < 0).any() or (self.P > 1).any():
                raise ValueError("P must hold probabilities in [0, 1]")
            if not torch.allclose(self.P + self.P.transpose(1, 2), torch.ones_like(self.P)):
                raise ValueError("P must satisfy P[c, a, b] + P[c, b, a] = 1")

    # --- names and indices

    @property
    def num_prompts(self) -> int:
        return self.ref.shape[0]

    @property
    def num_actions(self) -> int:
        return self.ref.shape[1]

    @property
    def prompts(self) -> list[str]:
        return [prompt_text(c) for c in range(self.num_prompts)]

    @property
    def actions(self) -> list[str]:
        return [action_text(k) for k in range(self.num_actions)]

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return build_tokenizer(self.num_prompts, self.num_actions)

    @cached_property
    def action_token_ids(self) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(self.actions)

    def prompt_index(self, prompt: str) -> int:
        """Index of a prompt string (surrounding whitespace ignored); ValueError naming it if unknown."""
        index = {p: c for c, p in enumerate(self.prompts)}.get(prompt.strip())
        if index is None:
            raise ValueError(f"{prompt!r} is not a prompt of this test bed "
                             f"(expected 'prompt 0'..'prompt {self.num_prompts - 1}')")
        return index

    def action_index(self, response: str) -> int:
        """Index of a response string; whitespace and a trailing EOS (TRL appends one) are ignored."""
        text = response.strip().removesuffix(EOS).strip()
        index = {a: k for k, a in enumerate(self.actions)}.get(text)
        if index is None:
            raise ValueError(f"{response!r} is not an action of this test bed "
                             f"(expected 'a0'..'a{self.num_actions - 1}')")
        return index

    # --- closed forms

    def reward_table(self) -> torch.Tensor:
        """The (C, K) reward, or a ValueError if this bandit has none."""
        if self.reward is None:
            raise ValueError("this test bed has no reward table (it was built from preferences only)")
        return self.reward

    def preference_matrix(self) -> torch.Tensor:
        """P (C, K, K) if given, else Bradley-Terry on the reward."""
        return self.P if self.P is not None else bradley_terry_matrix(self.reward_table())

    def optimal_policy(self, beta: float) -> torch.Tensor:
        """The KL-regularised optimum pi_ref * exp(r / beta) / Z. (C, K)"""
        return torch.from_numpy(tilt(self.ref.double().numpy(), self.reward_table().double().numpy(), beta))

    # --- model and data

    def build_model(self, seed: int = 0, hidden_size: int | None = None, closed: bool = True) -> LlamaForCausalLM:
        """A fresh tiny Llama whose policy is exactly `ref` (see `build_model`; `closed=False`: a plain Llama)."""
        return build_model(self, seed=seed, hidden_size=hidden_size, closed=closed)

    def save(self, directory, seed: int = 0, hidden_size: int | None = None, closed: bool = True) -> Path:
        """Write model, tokenizer and tables to `directory`; loadable with `from_pretrained` and `load`."""
        directory = Path(directory)
        self.build_model(seed, hidden_size, closed).save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        names = ("ref", "reward", "features", "theta", "P")
        tables = {name: getattr(self, name).tolist() for name in names if getattr(self, name) is not None}
        (directory / BANDIT_FILE).write_text(json.dumps(tables))
        return directory

    @classmethod
    def load(cls, directory) -> SingleTokenBandit:
        """The bandit whose tables `save` wrote to `directory`."""
        return cls(**json.loads((Path(directory) / BANDIT_FILE).read_text()))

    def prompt_dataset(self, repeats: int = 1) -> Dataset:
        """Every prompt `repeats` times, in order: a "prompt" column of strings."""
        return Dataset.from_dict({"prompt": self.prompts * repeats})

    def preference_dataset(
        self, n: int, seed: int = 0,
        sampler: torch.Tensor | None = None, oracle: PreferenceOracle | None = None,
    ) -> Dataset:
        """n labelled pairs: "prompt", "chosen", "rejected" strings and "preference_prob", P(chosen > rejected).

        Prompts cycle through the C prompts; the two responses are drawn independently from
        `sampler` (C, K), conditioned on being different (default: uniform over distinct
        pairs); the winner is drawn from `oracle` (default: Bradley-Terry on the reward).
        """
        C, K = self.ref.shape
        sampler = torch.full((C, K), 1.0 / K) if sampler is None else _table("sampler", sampler, (C, K))
        if (sampler < 0).any() or ((sampler > 0).sum(-1) < 2).any():
            raise ValueError("sampler must be nonnegative with >= 2 possible actions per prompt")
        g = torch.Generator().manual_seed(seed)
        c = torch.arange(n) % C  # (n,)
        a = torch.multinomial(sampler[c], 1, generator=g).squeeze(1)  # (n,)
        b = torch.multinomial(sampler[c], 1, generator=g).squeeze(1)  # (n,)
        while (tie := a == b).any():
            b[tie] = torch.multinomial(sampler[c[tie]], 1, generator=g).squeeze(1)
        oracle = oracle or BradleyTerryPreference(TestbedReward(self))
        prompts = [self.prompts[i] for i in c]
        probs = oracle.preference(prompts, [self.actions[i] for i in a], [self.actions[i] for i in b])
        a_wins = sample_preference_labels(probs, generator=g).bool()  # (n,)
        chosen = [self.actions[i] for i in torch.where(a_wins, a, b)]
        rejected = [self.actions[i] for i in torch.where(a_wins, b, a)]
        chosen_prob = torch.where(a_wins, probs, 1 - probs)  # (n,)
        return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected,
                                  "preference_prob": chosen_prob.tolist()})

    # --- typical instances

    @classmethod
    def random(
        cls, num_prompts: int = 4, num_actions: int = 8, seed: int = 0, ref_scale: float = 1.0,
        reward_scale: float = 1.0, feature_dim: int | None = None,
    ) -> SingleTokenBandit:
        """ref = softmax(ref_scale * N(0, 1)); reward = reward_scale * N(0, 1), or linear in
        N(0, 1/d) features with a unit-norm theta times reward_scale when `feature_dim` is given."""
        g = torch.Generator().manual_seed(seed)
        shape = (num_prompts, num_actions)
        ref = torch.softmax(ref_scale * torch.randn(shape, generator=g, dtype=torch.float64), -1)
        if feature_dim is None:
            return cls(ref, reward=reward_scale * torch.randn(shape, generator=g, dtype=torch.float64))
        features = torch.randn(*shape, feature_dim, generator=g, dtype=torch.float64) / math.sqrt(feature_dim)
        theta = torch.randn(feature_dim, generator=g, dtype=torch.float64)
        return cls(ref, features=features, theta=reward_scale * theta / theta.norm())

    @classmethod
    def underexplored(
        cls, num_prompts: int = 1, num_actions: int = 10, seed: int = 0, best_mass: float = math.exp(-8)
    ) -> SingleTokenBandit:
        """The reference puts `best_mass` on the best action (reward 1; others U(0, 0.5)).

        One-hot features over (prompt, action), so a linear learner is tabular: the best
        action's reward is learned only by playing it (ALGORITHMS.md section 1).
        """
        C, K = num_prompts, num_actions
        g = torch.Generator().manual_seed(seed)
        best = torch.randint(K, (C,), generator=g)  # (C,)
        reward = 0.5 * torch.rand(C, K, generator=g, dtype=torch.float64)
        reward[torch.arange(C), best] = 1.0
        rest = torch.softmax(torch.randn(C, K, generator=g, dtype=torch.float64), -1)
        rest[torch.arange(C), best] = 0.0
        ref = (1 - best_mass) * rest / rest.sum(-1, keepdim=True)
        ref[torch.arange(C), best] = best_mass
        features = torch.eye(C * K, dtype=torch.float64).view(C, K, C * K)
        return cls(ref, features=features, theta=reward.flatten())

    @classmethod
    def intransitive(
        cls, num_prompts: int = 2, num_actions: int = 8, seed: int = 0, ref_scale: float = 1.0, **kwargs
    ) -> SingleTokenBandit:
        """A random reference and an intransitive P (no reward); `kwargs` go to `intransitive_preferences`."""
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(num_prompts, num_actions, generator=g, dtype=torch.float64)  # (C, K)
        P = intransitive_preferences(num_prompts, num_actions, seed=seed + 1, **kwargs)
        return cls(torch.softmax(ref_scale * logits, -1), P=P)


# ----------------------------------------------------------------------------- oracles


def _action_or_none(bandit: SingleTokenBandit, response: str) -> int | None:
    """The action index of a response, or None for anything else (EOS first, another token)."""
    try:
        return bandit.action_index(response)
    except ValueError:
        return None


class TestbedReward(RewardOracle):
    """Reward-table lookup, plus optional Gaussian noise (std `noise_std`) per call.

    A response that is not one of the K actions (the policy put a little mass elsewhere, e.g. on
    EOS, and sampled it) is the worst response: reward min(r[c]) - 1. It is scored rather than
    refused because a real oracle scores whatever it is given; the exact metrics renormalise
    over the actions and report the off-action mass.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, bandit: SingleTokenBandit, noise_std: float = 0.0, seed: int | None = None):
        self.seed = seed
        self.table = bandit.reward_table()
        self.bandit = bandit
        self.noise_std = noise_std
        # seed None: noise from torch's global generator, which the online loop seeds per round and
        # chunk, so a resumed run draws the same noise; a seed gives a private, call-ordered stream.
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.name = "testbed_reward" if noise_std == 0 else f"testbed_reward(noise={noise_std})"
        self.reproducible = noise_std == 0 or seed is None  # a private stream depends on the call history

    def fingerprint(self) -> str:
        from klalign.runs.manifest import digest

        return f"{self.name}:table={digest(self.table.tolist())}:seed={self.seed}"

    def _score(self, prompts, responses):
        c = torch.tensor([self.bandit.prompt_index(p) for p in prompts], dtype=torch.long)
        k = [_action_or_none(self.bandit, r) for r in responses]
        worst = self.table.min(-1).values - 1  # (C,)
        base = torch.stack([self.table[ci, ki] if ki is not None else worst[ci] for ci, ki in zip(c, k)])
        noise = torch.randn(len(c), generator=self.generator, dtype=torch.float64)
        return base + self.noise_std * noise


class TestbedPreference(PreferenceOracle):
    """P(A beats B | prompt) looked up in the bandit's preference matrix (possibly intransitive)."""

    __test__ = False

    name = "testbed_preference"

    def __init__(self, bandit: SingleTokenBandit):
        self.matrix = bandit.preference_matrix()  # (C, K, K)
        self.bandit = bandit

    def fingerprint(self) -> str:
        from klalign.runs.manifest import digest

        return f"{self.name}:matrix={digest(self.matrix.tolist())}"

    def _preference(self, prompts, responses_a, responses_b):
        """A non-action response loses to every action and ties with another non-action."""
        c = [self.bandit.prompt_index(p) for p in prompts]
        a = [_action_or_none(self.bandit, r) for r in responses_a]
        b = [_action_or_none(self.bandit, r) for r in responses_b]
        return torch.tensor([
            0.5 if ai is None and bi is None else 0.0 if ai is None else 1.0 if bi is None else self.matrix[ci, ai, bi]
            for ci, ai, bi in zip(c, a, b)
        ], dtype=torch.float64)
