"""Building the oracle a config names (`OracleArguments`): a reward function, a reward model, an LM judge, a
pairwise preference model or a preference function, with Bradley-Terry labels for `feedback: preference`."""

from __future__ import annotations

from dataclasses import dataclass, field

from klalign.oracles.base import (
    BradleyTerryPreference,
    CallableReward,
    PreferenceOracle,
    RewardOracle,
)
from klalign.oracles.judges import LMJudgePreference
from klalign.oracles.reward_models import RewardModelOracle


def build_reward_oracle(reward_fn: str | None = None, reward_model_path: str | None = None, **load_kwargs) -> RewardOracle:
    """The reward oracle a config names: a function from `klalign.oracles.reward_functions`, or a reward-model folder."""
    if (reward_fn is None) == (reward_model_path is None):
        raise ValueError("set exactly one of reward_fn and reward_model_path")
    if reward_fn is not None:
        from klalign.oracles.reward_functions import get_reward_function

        return CallableReward(get_reward_function(reward_fn), name=reward_fn)
    from klalign.models.loading import load_reward_model

    model, tokenizer = load_reward_model(reward_model_path, **load_kwargs)
    return RewardModelOracle(model, tokenizer, name=f"reward_model({reward_model_path})")



@dataclass
class OracleArguments:
    """Where feedback comes from, for the online recipes. YAML keys map 1:1 onto these fields."""

    reward_fn: str | None = field(default=None, metadata={"help": "A reward function by name (klalign.oracles.reward_functions)."})
    reward_model_path: str | None = field(default=None, metadata={"help": "A sequence-classification reward model."})
    judge_model_path: str | None = field(
        default=None, metadata={"help": "A causal LM used as a pairwise judge (a preference oracle)."}
    )
    preference_model_path: str | None = field(
        default=None,
        metadata={"help": "A pairwise preference model: sequence classification over (prompt, A, B) giving "
                          "P(A > B), symmetrised over both orders (klalign.oracles.preference_models)."},
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
            from klalign.oracles.preference_models import PREFERENCE_FUNCTIONS

            if self.preference_fn not in PREFERENCE_FUNCTIONS:
                raise ValueError(f"unknown preference_fn {self.preference_fn!r}; expected one of "
                                 f"{sorted(PREFERENCE_FUNCTIONS)}")



def build_oracle(args: OracleArguments, **load_kwargs) -> RewardOracle | PreferenceOracle:
    """The oracle an `OracleArguments` names (models are loaded frozen, from local paths only)."""
    if args.judge_model_path is not None:
        from klalign.models.loading import load_causal_lm, load_tokenizer

        model = load_causal_lm(args.judge_model_path, trainable=False, **load_kwargs)
        tokenizer = load_tokenizer(args.judge_model_path, cache_dir=load_kwargs.get("cache_dir"))
        return LMJudgePreference(model, tokenizer, name=f"lm_judge({args.judge_model_path})")
    if args.preference_model_path is not None:
        from klalign.oracles.preference_models import (
            PairwisePreferenceModel,
            load_preference_model,
        )

        model, tokenizer = load_preference_model(args.preference_model_path, **load_kwargs)
        return PairwisePreferenceModel(model, tokenizer, name=f"preference_model({args.preference_model_path})")
    if args.preference_fn is not None:
        from klalign.oracles.preference_models import PREFERENCE_FUNCTIONS

        return PREFERENCE_FUNCTIONS[args.preference_fn]()
    reward = build_reward_oracle(args.reward_fn, args.reward_model_path, **load_kwargs)
    if args.feedback == "preference":
        return BradleyTerryPreference(reward, args.bradley_terry_temperature)
    return reward
