"""BestOfNSampler (argmax, chunking, streaming and resume, training data) and the sample-based BoN estimators."""

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from klalign.data.datasets import load_preference_dataset, load_prompt_dataset
from klalign.generation.types import GenerationArguments
from klalign.inference.best_of_n_sampling import (
    BestOfNSampler,
    best_of_n_expectation,
    best_of_n_weights,
    distillation_dataset,
    jackknife_se,
    level_mass,
    preference_dataset,
    read_best_of_n,
)
from klalign.oracles.base import CallableReward
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward


def table_oracle(bandit):
    """The reward table, for conversational prompts (the test bed renders those with BOS, like training)."""
    table = TestbedReward(bandit)
    return CallableReward(lambda prompts, responses: table.score([p[-1]["content"] for p in prompts], responses),
                          name="testbed")


def conversations(bandit):
    return [[{"role": "user", "content": p}] for p in bandit.prompts]


@pytest.fixture(scope="module")
def bandit():
    return SingleTokenBandit.random(4, 6, seed=0)


@pytest.fixture(scope="module")
def model_and_tokenizer(bandit):
    model = bandit.build_model()
    return model, bandit.tokenizer


class CountingGenerate:
    """Wraps model.generate to record the batch size of every call."""

    def __init__(self, model):
        self.model, self.sizes, self.inner = model, [], model.generate

    def __enter__(self):
        def generate(*args, **kwargs):
            self.sizes.append(kwargs["input_ids"].shape[0])
            return self.inner(*args, **kwargs)

        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate  # back to the class method


def test_best_is_argmax_and_n_larger_than_a_batch_is_chunked(bandit, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    oracle = table_oracle(bandit)
    generation = GenerationArguments(max_new_tokens=2, generation_batch_size=3)
    sampler = BestOfNSampler(model, tokenizer, oracle, n=7, generation=generation, progress=False)
    with CountingGenerate(model) as calls:
        results = sampler.sample(conversations(bandit))
    assert max(calls.sizes) <= 3 and sum(calls.sizes) == 4 * 7  # one prompt per group, its 7 over 3 calls
    reward = bandit.reward_table()
    for c, result in enumerate(results):
        assert len(result.responses) == len(result.scores) == 7
        actions = [bandit.action_index(r) for r in result.responses]
        assert result.scores == pytest.approx(reward[c, actions].tolist())  # the oracle scored these responses
        assert result.best_index == int(np.argmax(result.scores)) and result.best == result.responses[result.best_index]
        assert result.best_score == max(result.scores)


def test_small_n_groups_prompts_into_one_batch(bandit, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    generation = GenerationArguments(max_new_tokens=2, generation_batch_size=8)
    sampler = BestOfNSampler(model, tokenizer, table_oracle(bandit), n=2, generation=generation, progress=False)
    with CountingGenerate(model) as calls:
        sampler.sample(conversations(bandit))
    assert calls.sizes == [8]  # 4 prompts x 2 in one call


def test_streaming_resume_skips_done_prompts_and_repairs_a_torn_line(bandit, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    prompts = conversations(bandit)
    out = tmp_path / "bon.jsonl"
    generation = GenerationArguments(max_new_tokens=2, generation_batch_size=4)
    sampler = BestOfNSampler(model, tokenizer, table_oracle(bandit), n=4, generation=generation, progress=False)
    first = sampler.sample(prompts[:2], output_path=out)
    assert len(out.read_text().splitlines()) == 2  # appended prompt by prompt

    with out.open("a") as f:
        f.write('{"prompt": [{"role": "user", "content": "prom')  # a run killed mid-write
    with CountingGenerate(model) as calls:
        results = sampler.sample(prompts, output_path=out)
    assert sum(calls.sizes) == 2 * 4  # only the two new prompts were sampled
    assert [r.responses for r in results[:2]] == [r.responses for r in first]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert all(r["best"] == r["responses"][r["best_index"]] for r in records)
    assert [r.scores for r in read_best_of_n(out)] == [r.scores for r in results]

    with CountingGenerate(model) as calls:
        again = sampler.sample(prompts, output_path=out)
    assert calls.sizes == [] and [r.scores for r in again] == [r.scores for r in results]


def test_pairs_and_distillation_data_load_with_klalign_loaders(bandit, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    generation = GenerationArguments(max_new_tokens=2, generation_batch_size=32)
    results = BestOfNSampler(model, tokenizer, table_oracle(bandit), n=8, generation=generation,
                             progress=False).sample(conversations(bandit))

    preference_dataset(results).to_json(tmp_path / "pairs.jsonl")
    pairs = load_preference_dataset(tmp_path / "pairs.jsonl")
    distinct = [r for r in results if max(r.scores) > min(r.scores)]
    assert len(pairs) == len(distinct) > 0
    for row, r in zip(pairs, distinct):
        assert row["prompt"] == r.prompt
        assert row["chosen"] == [{"role": "assistant", "content": r.best}]
        assert row["rejected"][0]["content"] == r.responses[r.worst_index]
        assert row["chosen_score"] > row["rejected_score"]

    distillation_dataset(results).to_json(tmp_path / "distill.jsonl")
    distill = load_prompt_dataset(tmp_path / "distill.jsonl")
    assert [row["completion"][0]["content"] for row in distill] == [r.best for r in results]
    assert [row["score"] for row in distill] == pytest.approx([r.best_score for r in results])  # JSON keeps 10 digits


def test_u_statistic_equals_the_average_over_all_subsets():
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 4, size=(3, 7)).astype(float)  # ties on purpose
    values = rewards**2 + 1  # constant within a reward level
    for n in (1, 2, 3, 7):
        assert best_of_n_weights(7, n).sum() == pytest.approx(1.0)
        brute = [np.mean([values[i, max(s, key=lambda j: rewards[i, j])] for s in itertools.combinations(range(7), n)])
                 for i in range(3)]
        assert best_of_n_expectation(rewards, values, n) == pytest.approx(brute)
    assert np.isnan(jackknife_se(rewards, rewards, 7)) and jackknife_se(rewards, rewards, 2) > 0


def test_level_mass_is_exact_for_one_response_and_empirical_for_tied_responses():
    rewards = np.array([[0.5, 0.0, 0.5, 0.0, 0.9, 0.0]])
    logp = np.log(np.array([[0.3, 1e-9, 0.3, 2e-9, 0.1, 3e-9]]))
    ids = [[(1,), (7,), (1,), (8,), (2,), (9,)]]  # reward 0.0 is shared by three different responses
    eps = level_mass(rewards, logp, ids)
    assert eps[0, [0, 2, 4]] == pytest.approx([0.3, 0.3, 0.1])
    assert eps[0, [1, 3, 5]] == pytest.approx([0.5, 0.5, 0.5])
    assert level_mass(np.zeros((1, 2)), np.full((1, 2), -1e4), [[(1,), (1,)]]).min() > 0  # underflow is clamped
    assert torch.isfinite(torch.as_tensor(eps)).all()


def test_sampler_works_on_a_model_loaded_from_disk(bandit, tmp_path):
    folder = bandit.save(tmp_path / "ref")
    model = AutoModelForCausalLM.from_pretrained(folder)
    results = BestOfNSampler(model, bandit.tokenizer, table_oracle(bandit), n=3,
                             generation=GenerationArguments(max_new_tokens=2), progress=False).sample(
        conversations(bandit)[:1])
    assert len(results) == 1 and all(r in bandit.actions for r in results[0].responses)
