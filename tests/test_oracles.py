"""Oracles: bad outputs fail loudly naming the oracle and the example; judges remove position bias."""

import math

import pytest
import torch

from klalign.errors import OracleError
from klalign.oracles.base import BradleyTerryPreference, CallableReward
from klalign.oracles.build import OracleArguments, build_oracle
from klalign.oracles.judges import LMJudgePreference
from klalign.oracles.reward_models import RewardModelOracle

PROMPTS, RESPONSES = ["p0", "p1", "p2"], ["r0", "r1", "r2"]


@pytest.mark.parametrize(
    "scores, message",
    [
        ([1.0, math.nan, 0.0], "oracle 'bad' returned nan for example 1 .*'p1'.*'r1'"),
        ([1.0, 0.0, math.inf], "oracle 'bad' returned inf for example 2"),
        ([1.0, 2.0], "oracle 'bad' returned 2 scores for 3 responses"),
    ],
)
def test_bad_reward_outputs_are_named(scores, message):
    with pytest.raises(OracleError, match=message):
        CallableReward(lambda p, r: scores, name="bad").score(PROMPTS, RESPONSES)


def test_preference_outside_unit_interval_is_named():
    class Broken(BradleyTerryPreference):
        def _preference(self, prompts, a, b):
            return [0.5, 1.2, 0.1]

    oracle = Broken(CallableReward(lambda p, r: [0.0] * len(r)))
    with pytest.raises(OracleError, match=r"returned 1.2 for example 1.*\[0.0, 1.0\]"):
        oracle.preference(PROMPTS, RESPONSES, RESPONSES)


def test_mismatched_lengths_are_named():
    with pytest.raises(OracleError, match="3 prompts but 2 responses"):
        CallableReward(lambda p, r: [0.0] * len(r)).score(PROMPTS, RESPONSES[:2])


def test_bradley_terry_is_sigmoid_of_the_reward_difference():
    reward = CallableReward(lambda p, r: [float(len(x)) for x in r])
    probs = BradleyTerryPreference(reward, temperature=2.0).preference(["x", "x"], ["aaa", "a"], ["a", "aaa"])
    torch.testing.assert_close(probs, torch.sigmoid(torch.tensor([1.0, -1.0], dtype=torch.float64)))


def test_judge_averages_both_orders():
    """A judge that always prefers the first-shown response by 0.8 is neutral (0.5) after averaging;
    one that also prefers 'good' keeps that preference."""

    class PositionBiased(LMJudgePreference):
        def __init__(self):
            self.name = "biased"

        def _first_wins(self, prompts, firsts, seconds):
            return torch.tensor([0.8 + (0.1 if f == "good" else 0.0) - (0.1 if s == "good" else 0.0)
                                 for f, s in zip(firsts, seconds)])

    probs = PositionBiased().preference(["q", "q"], ["x", "good"], ["y", "bad"])
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.6], dtype=torch.float64))


def test_real_judge_on_a_tiny_lm(tiny_tokenizer):
    from klalign.models.tiny import build_causal_lm

    judge = LMJudgePreference(build_causal_lm(tiny_tokenizer, seed=0), tiny_tokenizer, batch_size=2)
    probs = judge.preference(["How was it?"] * 3, ["great", "bad", "fine"], ["bad", "great", "fine"])
    assert probs.shape == (3,) and ((probs > 0) & (probs < 1)).all()
    assert probs[2].item() == pytest.approx(0.5, abs=1e-6)  # identical responses: no preference
    assert probs[0].item() == pytest.approx(1 - probs[1].item(), abs=1e-6)  # swapping A and B flips it


def test_reward_model_oracle_scores_in_batches(tiny_tokenizer):
    from klalign.models.tiny import build_reward_model

    model = build_reward_model(tiny_tokenizer).eval()
    oracle = RewardModelOracle(model, tiny_tokenizer, batch_size=2)
    texts = ["It was great.", "Awful!", "Fine, I think."]
    scores = oracle.score(["How was it?"] * 3, texts)
    one_by_one = torch.cat([oracle.score(["How was it?"], [t]) for t in texts])
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=0)  # padding does not change a score


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of"),
        (dict(reward_fn="vader", judge_model_path="x"), "exactly one of"),
        (dict(reward_fn="vader", feedback="votes"), "feedback must be"),
        (dict(judge_model_path="x"), "judge_model_path gives preferences"),
        (dict(preference_model_path="x"), "preference_model_path gives preferences"),
        (dict(preference_fn="cyclic_text", reward_fn="vader", feedback="preference"), "exactly one of"),
        (dict(preference_fn="vibes", feedback="preference"), "unknown preference_fn"),
    ],
)
def test_oracle_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OracleArguments(**kwargs)


def test_build_oracle_from_config():
    reward = build_oracle(OracleArguments(reward_fn="vader"))
    assert reward.score(["q"], ["I love this!"]).item() > 0.5
    preference = build_oracle(OracleArguments(reward_fn="vader", feedback="preference"))
    assert preference.preference(["q"], ["I love this!"], ["I hate this."]).item() > 0.5
    with pytest.raises(ValueError, match="unknown reward function 'vibes'"):
        build_oracle(OracleArguments(reward_fn="vibes"))
