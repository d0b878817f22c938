"""On-policy sampling by construction: whatever sampling defaults a checkpoint ships, `sample_completions`
draws from the policy the model computes (the test bed's exact `read_policy`); sampled pad tokens are
kept; a checkpoint's list of stop tokens is honoured."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer

from klalign.generation.hf import stop_token_ids
from klalign.generation.hf import strip_after_stop as _strip
from klalign.generation.sample import sample_completions
from klalign.generation.types import GenerationArguments
from klalign.testbed.bandit import SingleTokenBandit
from klalign.testbed.model import read_policy

# Instruct checkpoints ship such defaults; each changes the sampled law of the test bed's policy.
BIASING_DEFAULTS = {"min_p": 0.25, "typical_p": 0.5, "repetition_penalty": 1.3, "top_k": 3, "temperature": 0.7}


@pytest.fixture(scope="module")
def bandit():
    return SingleTokenBandit.random(num_prompts=3, num_actions=8, seed=4, ref_scale=1.5)


@pytest.fixture(scope="module")
def biased_folder(bandit, tmp_path_factory):
    """A test-bed checkpoint whose generation_config.json carries sampling defaults."""
    folder = bandit.save(tmp_path_factory.mktemp("biased"))
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(BIASING_DEFAULTS, do_sample=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def action_counts(bandit, samples) -> np.ndarray:
    """(C, K) counts of the sampled actions (every sample must be [action, EOS])."""
    counts = np.zeros((bandit.num_prompts, bandit.num_actions))
    for c, per_prompt in enumerate(samples):
        for s in per_prompt:
            counts[c, bandit.action_index(s.text)] += 1
    return counts


def test_checkpoint_sampling_defaults_do_not_change_the_sampled_law(bandit, biased_folder):
    model = AutoModelForCausalLM.from_pretrained(biased_folder)
    tokenizer = AutoTokenizer.from_pretrained(biased_folder)
    assert model.generation_config.min_p == 0.25  # the defaults are really in the checkpoint
    n = 3000
    samples = sample_completions(model, tokenizer, bandit.prompts, n, GenerationArguments(max_new_tokens=2),
                                 seed=0, progress=False)
    counts = action_counts(bandit, samples)
    policy = read_policy(model, bandit).numpy()  # (C, K), the exact law of the model
    for c in range(bandit.num_prompts):
        assert chisquare(counts[c], n * policy[c] / policy[c].sum()).pvalue > 1e-4
    # The same defaults, applied as generate() would apply them by default, give a different law:
    # the test has the power to fail.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ids = tokenizer(bandit.prompts, return_tensors="pt").input_ids.repeat_interleave(500, dim=0)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1)
    to_action = {t: k for k, t in enumerate(bandit.action_token_ids)}
    biased = np.zeros_like(counts)
    for row, token in enumerate(out[:, -1].tolist()):
        biased[row // 500, to_action[token]] += 1
    assert chisquare(biased[0] + 1e-9, 500 * policy[0] / policy[0].sum()).pvalue < 1e-6
    assert model.generation_config.min_p == 0.25  # sampling leaves the checkpoint's config as it was


def test_strip_cuts_at_the_first_stop_and_keeps_sampled_pad_tokens():
    pad, eos, other_stop = 0, 2, 9
    assert _strip([5, pad, 7, eos, pad, pad], [eos]) == [5, pad, 7, eos]
    assert _strip([5, pad, 7], [eos]) == [5, pad, 7]  # ran to max_new_tokens: every token was sampled
    assert _strip([5, other_stop, 7, eos], [eos, other_stop]) == [5, other_stop]


def test_sampled_pad_tokens_are_kept_when_pad_differs_from_eos(bandit, tmp_path):
    """The test bed's tokenizer has pad != eos; make the pad token as likely as action 0 (in the plain
    Llama bed: the closed one cannot emit anything but an action and EOS)."""
    model = bandit.build_model(closed=False)
    tokenizer = bandit.tokenizer
    pad, a0 = tokenizer.pad_token_id, bandit.action_token_ids[0]
    assert pad != tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[pad] = model.lm_head.weight[a0]
    samples = sample_completions(model, tokenizer, bandit.prompts, 200, GenerationArguments(max_new_tokens=3),
                                 seed=0, progress=False)
    starts_with_pad = [s for per_prompt in samples for s in per_prompt if s.completion_ids[0] == pad]
    assert starts_with_pad, "the pad token was never sampled"
    assert all(len(s.completion_ids) >= 2 for s in starts_with_pad)  # the sampled pad and what followed it


def test_a_checkpoints_list_of_stop_tokens_is_honoured(bandit):
    model = bandit.build_model()
    tokenizer = bandit.tokenizer
    a3 = bandit.action_token_ids[3]
    model.generation_config.eos_token_id = [a3, tokenizer.eos_token_id]  # a second stop token
    assert stop_token_ids(model, tokenizer) == [a3, tokenizer.eos_token_id]
    samples = sample_completions(model, tokenizer, bandit.prompts, 300, GenerationArguments(max_new_tokens=2),
                                 seed=0, progress=False)
    flat = [s for per_prompt in samples for s in per_prompt]
    assert any(s.completion_ids == [a3] for s in flat)  # stopped at the checkpoint's own stop token
    assert all(s.completion_ids == [a3] or s.completion_ids[-1] == tokenizer.eos_token_id for s in flat)
