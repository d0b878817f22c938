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
`klalign.closed_actions.ClosedActionLlamaForCausalLM`, a registered Llama subclass whose forward pass
allows only the K actions after a prompt and only EOS after an action, so no training of any weight
can move probability off the actions (a plain Llama can: DPO is blind to a shift shared by all of a
prompt's action logits, and Adam on every weight leaked up to 0.998 of a prompt's mass to EOS; see
that module's docstring). `closed=False` builds the same weights as a plain `LlamaForCausalLM`, for
backends that only know standard architectures (vLLM); its off-action mass is then only kept small
by the fitted head, and full fine-tuning can raise it.

How the reference policy is set exactly: build the model at random (with orthogonal token
embeddings, so that different prompts end in nearly orthogonal hidden states), read the final
hidden states at the end of each prompt and after each prompt + action, then solve the untied
lm_head so that the logits there are log ref on the actions (exactly), NON_ACTION_GAP lower on
every other token, and EOS ahead of every other token after an action.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from klalign.closed_actions import ClosedActionLlamaConfig, ClosedActionLlamaForCausalLM
from klalign.oracles import BradleyTerryPreference, PreferenceOracle, RewardOracle, sample_preference_labels

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
NON_ACTION_GAP = 20.0  # off-action mass <= (V - K) * e^-20; wider means larger logits, more float32 rounding
POLICY_ATOL = 1e-5  # how far the built model's policy may be from `ref` (float32 logits: ~1e-6 seen)
BANDIT_FILE = "bandit.json"  # the tables, saved beside the model so the folder is self-describing

# Content only, EOS after an assistant turn: a conversational prompt renders exactly like the
# plain string, so the conversational and the plain formats give the same token ids.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def prompt_text(c: int) -> str:
    """The c-th prompt string; it tokenizes to [BOS, "prompt", "<c>"]."""
    return f"prompt {c}"


def action_text(k: int) -> str:
    """The k-th action (response) string; it is one token."""
    return f"a{k}"


def build_tokenizer(num_prompts: int, num_actions: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the test bed's closed vocabulary, BOS added, padding on the left.

    The pre-tokenizer splits on whitespace and isolates action words, so "prompt 3a5",
    "prompt 3 a5" and "prompt 3 a5</s>" all tokenize as the prompt's tokens + [a5] (+ [EOS]):
    TRL can concatenate prompt and completion strings either way.
    """
    specials = [PAD, BOS, EOS, UNK]
    words = ["prompt"] + [str(c) for c in range(num_prompts)] + [action_text(k) for k in range(num_actions)]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"a\d+"), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )


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


def tilt(ref: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """The KL-regularised optimum pi_ref * exp(r / beta) / Z, row by row. (C, K) -> (C, K)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return torch.softmax(ref.log() + reward / beta, dim=-1)


# ----------------------------------------------------------------------------- the model


def _input_ids(tokenizer, texts: list[str], device) -> torch.Tensor:
    """Token ids of equal-length texts (every test-bed prompt has 3 tokens), no padding. (N, L)"""
    return tokenizer(texts, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def _fit_lm_head(model: LlamaForCausalLM, bandit: SingleTokenBandit) -> None:
    """Solve lm_head so that the logits at the constrained positions equal their targets.

    Every token but the K actions and EOS gets an all-zero row, so its logit is 0 whatever the
    hidden state. That alone does not keep the mass on the actions of a plain Llama under training:
    the action logits themselves can all fall below 0 together (the module docstring); the closed
    architecture makes the fitted EOS and non-action rows irrelevant. At the end of prompt c (exact): the actions at log ref[c] shifted to NON_ACTION_GAP above 0,
    EOS at 0. After prompt + action (least squares, in directions that leave the prompt logits
    alone): EOS NON_ACTION_GAP above the actions. The C rows of one action are near duplicates
    (same last token) with equal targets, so that fit is truncated where an exact one would blow
    the weights up.
    """
    C, K, V = bandit.num_prompts, bandit.num_actions, model.config.vocab_size
    texts = [p + a for p in bandit.prompts for a in bandit.actions]
    ids = _input_ids(bandit.tokenizer, texts, model.device)  # (C*K, L+1)
    hidden = model.model(input_ids=ids).last_hidden_state.double().cpu()  # (C*K, L+1, h)
    h_prompt = hidden.view(C, K, ids.shape[1], -1)[:, 0, -2]  # (C, h): the action is not seen yet
    h_action = hidden[:, -1]  # (C*K, h)

    rows = list(bandit.action_token_ids) + [bandit.tokenizer.eos_token_id]  # the K + 1 fitted rows
    log_ref = bandit.ref.log()  # (C, K)
    t_prompt = torch.zeros(C, K + 1, dtype=torch.float64)  # (C, K+1): EOS last, at 0
    t_prompt[:, :K] = log_ref - log_ref.min(-1, keepdim=True).values + NON_ACTION_GAP
    t_action = torch.zeros(C * K, K + 1, dtype=torch.float64)  # (C*K, K+1): actions at 0
    t_action[:, K] = NON_ACTION_GAP

    pinv = torch.linalg.pinv(h_prompt)  # (h, C)
    W = pinv @ t_prompt  # (h, K+1): the minimum-norm exact fit at the prompts
    null = torch.eye(W.shape[0], dtype=torch.float64) - pinv @ h_prompt  # (h, h): leaves prompt logits alone
    fit = torch.linalg.lstsq(h_action @ null, t_action - h_action @ W, rcond=1e-3, driver="gelsd")
    W = W + null @ fit.solution  # (h, K+1)
    weight = torch.zeros(V, W.shape[0], dtype=torch.float64)  # (V, h): zero rows off the actions and EOS
    weight[rows] = W.T
    model.lm_head.weight.copy_(weight.to(model.lm_head.weight.dtype))


def default_hidden_size(vocab_size: int) -> int:
    """At least 64 and 8 more than the vocabulary, so that the token embeddings can be orthogonal."""
    return 16 * math.ceil(max(64, vocab_size + 8) / 16)


def build_model(
    bandit: SingleTokenBandit, seed: int = 0, hidden_size: int | None = None, num_layers: int = 2,
    closed: bool = True,
) -> LlamaForCausalLM:
    """A tiny Llama whose policy at every prompt of `bandit` is exactly its `ref` (C, K).

    `closed` (default): a `ClosedActionLlamaForCausalLM`, whose outputs no training can move off the
    actions; False: a plain `LlamaForCausalLM` with the same weights (module docstring). The policy
    is checked after the fit; a RuntimeError says so if it is not exact (a hidden size below
    `default_hidden_size` may not leave room for it).
    """
    tokenizer = bandit.tokenizer
    hidden_size = hidden_size or default_hidden_size(len(tokenizer))
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if closed:
        config = ClosedActionLlamaConfig(**settings, action_token_ids=list(bandit.action_token_ids),
                                         stop_token_id=tokenizer.eos_token_id)
        architecture = ClosedActionLlamaForCausalLM
    else:
        config, architecture = LlamaConfig(**settings), LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = architecture(config).eval()
        # Orthogonal token embeddings with RMS 1 dominate the (std 0.02) attention and MLP outputs,
        # so each prompt ends in a nearly orthogonal hidden state: the fit is well conditioned and
        # training moves each prompt's policy nearly independently, as in a tabular bandit.
        with torch.no_grad():
            torch.nn.init.orthogonal_(model.model.embed_tokens.weight, gain=math.sqrt(hidden_size))
    _fit_lm_head(model, bandit)
    error = (read_policy(model, bandit) - bandit.ref).abs().max().item()
    worst_eos = eos_after_action(model, bandit).min().item()
    if error > POLICY_ATOL or worst_eos < 1 - POLICY_ATOL:
        raise RuntimeError(
            f"could not set the policy exactly (max error {error:.3g}, min EOS probability {worst_eos:.6f});"
            f" hidden_size={hidden_size} may be too small (default {default_hidden_size(len(tokenizer))})"
        )
    return model


# ----------------------------------------------------------------------------- reading the model


@torch.no_grad()
def _next_token_logprobs(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Full-vocabulary log-probabilities of the next token after each text. (N, V) float64"""
    device = next(model.parameters()).device
    ids = _input_ids(tokenizer, texts, device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]  # (N, V)
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def read_policy(model, bandit: SingleTokenBandit) -> torch.Tensor:
    """The model's exact policy over the actions at every prompt. (C, K) float64

    Full-vocabulary softmax restricted to the action tokens (not renormalised: see
    `off_action_mass`). Works for any causal LM over the test-bed vocabulary, PEFT-wrapped too.
    """
    logp = _next_token_logprobs(model, bandit.tokenizer, bandit.prompts)  # (C, V)
    return logp[:, bandit.action_token_ids].exp()


def off_action_mass(model, bandit: SingleTokenBandit) -> torch.Tensor:
    """Probability of a non-action token at the end of each prompt. (C,) float64"""
    return 1 - read_policy(model, bandit).sum(-1)


def eos_after_action(model, bandit: SingleTokenBandit) -> torch.Tensor:
    """Probability that EOS follows each action, i.e. that a completion is [action, EOS]. (C, K)"""
    texts = [p + a for p in bandit.prompts for a in bandit.actions]
    logp = _next_token_logprobs(model, bandit.tokenizer, texts)  # (C*K, V)
    return logp[:, bandit.tokenizer.eos_token_id].exp().view(bandit.num_prompts, bandit.num_actions)


@torch.no_grad()
def sample_actions(model, bandit: SingleTokenBandit, num_samples: int, seed: int = 0) -> torch.Tensor:
    """Action indices drawn with `model.generate(do_sample=True)`, -1 for a non-action token. (C, n)

    This is the path trainers take to sample; comparing it with `read_policy` checks that the
    exact policy is the one generation actually uses.
    """
    tokenizer = bandit.tokenizer
    device = next(model.parameters()).device
    ids = _input_ids(tokenizer, bandit.prompts, device).repeat_interleave(num_samples, dim=0)  # (C*n, L)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=1,
            top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tokenizer.pad_token_id,
        )
    to_action = torch.full((len(tokenizer),), -1, dtype=torch.long)  # (V,)
    to_action[bandit.action_token_ids] = torch.arange(bandit.num_actions)
    return to_action[out[:, -1].cpu()].view(bandit.num_prompts, num_samples)


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
        return tilt(self.ref, self.reward_table(), beta)

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
        """n labelled pairs: "prompt", "chosen", "rejected" strings.

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
        return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})

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
        from klalign.manifest import digest

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
        from klalign.manifest import digest

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
