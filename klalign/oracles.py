"""Oracles: where feedback comes from.

Two kinds, one small interface each, both batched:

- a `RewardOracle` scores responses: `score(prompts, responses) -> (N,)` float tensor;
- a `PreferenceOracle` compares two responses to the same prompt:
  `preference(prompts, responses_a, responses_b) -> (N,)` probabilities that A beats B.

Every oracle's output goes through `check_scores`, so a NaN, an infinity or a wrong count
fails loudly with the oracle's name and the offending example instead of poisoning training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from klalign.distributed import place_frozen


class OracleError(ValueError):
    """An oracle returned something unusable (wrong count, NaN, infinity, out of range)."""


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
    the oracle in a run's manifest (`klalign.manifest`)."""

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


class RewardModelOracle(RewardOracle):
    """An `AutoModelForSequenceClassification` with one output scoring prompt + response text.

    Conversational prompts (lists of messages) are rendered with the reward tokenizer's chat
    template with the response as the assistant turn; string prompts are concatenated.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None, name: str = "reward_model"):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.name = batch_size, max_length, name
        self._fingerprint = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # of the weights as loaded (computed before the model is prepared)
            from klalign.manifest import model_fingerprint

            self._fingerprint = f"{self.name}:{model_fingerprint(self.model)}:max_length={self.max_length}"
        return self._fingerprint

    def prepare(self, accelerator=None, device=None):
        self.model = place_frozen(self.model, accelerator, device)
        return self

    def _text(self, prompt, response: str) -> str:
        if isinstance(prompt, str):
            return prompt + response
        messages = [*prompt, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def _score(self, prompts, responses):
        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(device)
            scores.append(self.model(**enc).logits[:, 0].float().cpu())  # (b,)
        return torch.cat(scores)


def build_reward_oracle(reward_fn: str | None = None, reward_model_path: str | None = None, **load_kwargs) -> RewardOracle:
    """The reward oracle a config names: a function from `klalign.rewards`, or a reward-model folder."""
    if (reward_fn is None) == (reward_model_path is None):
        raise ValueError("set exactly one of reward_fn and reward_model_path")
    if reward_fn is not None:
        from klalign.rewards import get_reward_function

        return CallableReward(get_reward_function(reward_fn), name=reward_fn)
    from klalign.models import load_reward_model

    model, tokenizer = load_reward_model(reward_model_path, **load_kwargs)
    return RewardModelOracle(model, tokenizer, name=f"reward_model({reward_model_path})")


JUDGE_TEMPLATE = (
    "Which response answers the prompt better?\n\nPrompt: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
    "Answer with A or B. The better response is"
)


class LMJudgePreference(PreferenceOracle):
    """A local causal LM as a pairwise judge.

    P(A > B) is read from the judge's next-token log-probs of " A" and " B" (or "A", "B") after a comparison
    prompt, normalised over the two; the pair is judged in both orders and the two estimates
    averaged, `(p(A | A first) + 1 - p(A | B first)) / 2`, which removes position bias. With a chat
    tokenizer the question is the user turn and the answer starts the assistant turn.
    """

    def __init__(self, model, tokenizer, template: str = JUDGE_TEMPLATE, batch_size: int = 8, name: str = "lm_judge"):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size, self.name = batch_size, name
        self.choice_ids = [self._single_token(letter) for letter in "AB"]
        self._fingerprint = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from klalign.manifest import digest, model_fingerprint

            self._fingerprint = f"{self.name}:{model_fingerprint(self.model)}:template={digest(self.template)}"
        return self._fingerprint

    def prepare(self, accelerator=None, device=None):
        self.model = place_frozen(self.model, accelerator, device)
        return self

    def _single_token(self, letter: str) -> int:
        """The answer token: " A" where the tokenizer has it as one token (most BPEs), else "A"."""
        for text in (f" {letter}", letter):
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) == 1:
                return ids[0]
        raise ValueError(f"judge {self.name!r}: neither ' {letter}' nor '{letter}' is one token for this tokenizer")

    def _query(self, prompt, a: str, b: str) -> list[int]:
        question = self.template.format(prompt=prompt if isinstance(prompt, str) else prompt[-1]["content"], a=a, b=b)
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            ) + "The better response is"
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(question).input_ids

    @torch.no_grad()
    def _first_wins(self, prompts, firsts, seconds) -> torch.Tensor:
        """P(the first-shown response is better) for each example. (N,)"""
        from klalign.generation import _left_padded  # the same left padding generation uses

        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(prompts), self.batch_size):
            rows = [self._query(p, a, b) for p, a, b in zip(*(x[start : start + self.batch_size]
                                                              for x in (prompts, firsts, seconds)))]
            enc = _left_padded(rows, self.tokenizer.pad_token_id, device)
            logits = self.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (b, V)
            out.append(torch.softmax(logits[:, self.choice_ids], dim=-1)[:, 0].cpu())  # (b,)
        return torch.cat(out)

    def _preference(self, prompts, responses_a, responses_b):
        a_first = self._first_wins(prompts, responses_a, responses_b)
        b_first = self._first_wins(prompts, responses_b, responses_a)
        return (a_first + 1 - b_first) / 2


@dataclass
class OracleArguments:
    """Where feedback comes from, for the online recipes. YAML keys map 1:1 onto these fields."""

    reward_fn: str | None = field(default=None, metadata={"help": "A reward function by name (klalign.rewards)."})
    reward_model_path: str | None = field(default=None, metadata={"help": "A sequence-classification reward model."})
    judge_model_path: str | None = field(
        default=None, metadata={"help": "A causal LM used as a pairwise judge (a preference oracle)."}
    )
    preference_model_path: str | None = field(
        default=None,
        metadata={"help": "A pairwise preference model: sequence classification over (prompt, A, B) giving "
                          "P(A > B), symmetrised over both orders (klalign.preference_models)."},
    )
    preference_fn: str | None = field(
        default=None, metadata={"help": "A preference function by name: cyclic_text (an intransitive text judge)."}
    )
    feedback: str = field(
        default="reward",
        metadata={"help": "'reward' (scores) or 'preference' (Bradley-Terry labels drawn from a reward's scores)."},
    )
    bradley_terry_temperature: float = field(
        default=1.0, metadata={"help": "P(A > B) = sigmoid((r_A - r_B) / temperature) with feedback: preference."}
    )

    def __post_init__(self):
        names = ("reward_fn", "reward_model_path", "judge_model_path", "preference_model_path", "preference_fn")
        if sum(getattr(self, name) is not None for name in names) != 1:
            raise ValueError(f"set exactly one of {', '.join(names)}")
        if self.feedback not in ("reward", "preference"):
            raise ValueError(f"feedback must be 'reward' or 'preference', got {self.feedback!r}")
        for name in names[2:]:
            if getattr(self, name) is not None and self.feedback != "preference":
                raise ValueError(f"{name} gives preferences: set feedback: preference with it")
        if self.preference_fn is not None:
            from klalign.preference_models import PREFERENCE_FUNCTIONS

            if self.preference_fn not in PREFERENCE_FUNCTIONS:
                raise ValueError(f"unknown preference_fn {self.preference_fn!r}; expected one of "
                                 f"{sorted(PREFERENCE_FUNCTIONS)}")


def build_oracle(args: OracleArguments, **load_kwargs) -> RewardOracle | PreferenceOracle:
    """The oracle an `OracleArguments` names (models are loaded frozen, from local paths only)."""
    if args.judge_model_path is not None:
        from klalign.models import load_causal_lm, load_tokenizer

        model = load_causal_lm(args.judge_model_path, trainable=False, **load_kwargs)
        tokenizer = load_tokenizer(args.judge_model_path, cache_dir=load_kwargs.get("cache_dir"))
        return LMJudgePreference(model, tokenizer, name=f"lm_judge({args.judge_model_path})")
    if args.preference_model_path is not None:
        from klalign.preference_models import PairwisePreferenceModel, load_preference_model

        model, tokenizer = load_preference_model(args.preference_model_path, **load_kwargs)
        return PairwisePreferenceModel(model, tokenizer, name=f"preference_model({args.preference_model_path})")
    if args.preference_fn is not None:
        from klalign.preference_models import PREFERENCE_FUNCTIONS

        return PREFERENCE_FUNCTIONS[args.preference_fn]()
    reward = build_reward_oracle(args.reward_fn, args.reward_model_path, **load_kwargs)
    if args.feedback == "preference":
        return BradleyTerryPreference(reward, args.bradley_terry_temperature)
    return reward
