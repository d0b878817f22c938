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


# ---- the sampler's log-probs of its tokens (sampler_logprobs), without keeping every step's scores

def output_scores_logprobs(model, tokenizer, prompts, num_samples, args) -> list[tuple[list[int], list[float]]]:
    """The reference: (completion ids, log-probs) as `generate(output_scores=True)` gives them, one (B, V) score
    tensor per step kept to the end, on the batches `hf_sample` makes."""
    from klalign.data.prompts import prompt_token_ids
    from klalign.generation.hf import sampling_config, without_checkpoint_defaults
    from klalign.ops.batching import left_padded

    stop = stop_token_ids(model, tokenizer)
    config = sampling_config(args, stop, tokenizer.pad_token_id)
    config.output_scores = config.return_dict_in_generate = True
    flat = [prompt_token_ids(tokenizer, p) for p in prompts for _ in range(num_samples)]
    done = []
    with without_checkpoint_defaults(model):
        for start in range(0, len(flat), args.generation_batch_size):
            enc = left_padded(flat[start : start + args.generation_batch_size], tokenizer.pad_token_id, "cpu")
            out = model.generate(**enc, generation_config=config)
            new = out.sequences[:, enc["input_ids"].size(1) :]
            logps = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                                 for t, step in enumerate(out.scores)], dim=1)
            for ids, row in zip(new.tolist(), logps.tolist()):
                kept = _strip(ids, stop)
                done.append((kept, row[: len(kept)]))
    return done


@pytest.fixture(scope="module")
def likely_to_stop(tiny_policy_dir):
    """The tiny policy with EOS's logit raised by 2: rows of one batch stop at different steps."""
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    raise_eos = torch.zeros(model.config.vocab_size)
    raise_eos[tokenizer.eos_token_id] = 2.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + raise_eos)
    return model, tokenizer


def test_sampler_logprobs_equal_generates_processed_scores(likely_to_stop):
    from klalign.generation.hf import SampledTokenLogprobs, hf_sample

    model, tokenizer = likely_to_stop
    prompts = ["Hi", "How was the movie today, tell me?", [{"role": "user", "content": "Describe the city."}],
               "I think the food was great and the trip was long. It is"]
    args = GenerationArguments(temperature=0.7, top_p=0.9, max_new_tokens=24, generation_batch_size=8)
    torch.manual_seed(3)
    reference = output_scores_logprobs(model, tokenizer, prompts, 4, args)
    torch.manual_seed(3)
    samples = hf_sample(model, tokenizer, prompts, 4, args, progress=False, sampler_logprobs=True)
    lengths = [len(ids) for ids, _ in reference]
    assert sum(n < 24 for n in lengths) >= 4 and sum(n == 24 for n in lengths) >= 2  # early stops beside full rows
    for sample, (ids, logps) in zip(samples, reference, strict=True):
        assert sample.completion_ids == ids  # the same draws: the sampled law is unchanged
        np.testing.assert_allclose(sample.sampler_logprobs, logps, rtol=0, atol=1e-6)
    # transformers puts a caller's processors before its temperature and top_p warpers: a recorder passed
    # as it is would record the unprocessed law (hence `recording_sampled_logprobs`).
    from klalign.generation.hf import sampling_config, without_checkpoint_defaults

    naive = SampledTokenLogprobs()
    ids = torch.tensor([tokenizer("Hi").input_ids])
    with without_checkpoint_defaults(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), logits_processor=[naive],
                             generation_config=sampling_config(args, [tokenizer.eos_token_id], tokenizer.pad_token_id))
        new = out[:, ids.size(1) :]
        with_naive = naive.finish(new)
    torch.manual_seed(0)
    assert with_naive.shape == new.shape and (with_naive < 0).all()
    processed = torch.log_softmax(model(out).logits[0, ids.size(1) - 1 : -1].float() / 0.7, -1)
    assert (with_naive[0] - processed.gather(-1, new[0, :, None]).squeeze(-1)).abs().max() > 1e-2


def test_sampled_law_is_the_tempered_nucleus(bandit):
    """`sample_completions` draws from softmax(logits / T) cut to the top-p nucleus (transformers' warpers applied to
    the bed's exact logits), and not the untempered law: 3000 draws per prompt, chi-square."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from klalign.testbed.model import _next_token_logprobs

    model, tokenizer = bandit.build_model(), bandit.tokenizer
    n, args = 3000, GenerationArguments(max_new_tokens=2, temperature=1.5, top_p=0.9)
    samples = sample_completions(model, tokenizer, bandit.prompts, n, args, seed=0, progress=False)
    counts = action_counts(bandit, samples)
    logits = _next_token_logprobs(model, tokenizer, bandit.prompts).float()  # (C, V): logits up to a constant
    law = torch.softmax(TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(1.5)(None, logits)), -1)
    law = law[:, bandit.action_token_ids].double().numpy()  # (C, K)
    untempered = read_policy(model, bandit).numpy()
    for c in range(bandit.num_prompts):
        keep = law[c] > 0
        assert counts[c][~keep].sum() == 0  # nothing outside the nucleus
        assert counts[c][keep].sum() == n
        assert chisquare(counts[c][keep], n * law[c][keep] / law[c][keep].sum()).pvalue > 1e-4
    assert min(chisquare(counts[c] + 1e-9, n * untempered[c] / untempered[c].sum()).pvalue
               for c in range(bandit.num_prompts)) < 1e-6


def test_sampler_logprobs_keep_no_per_step_scores(likely_to_stop, monkeypatch):
    """`output_scores` keeps (B, V) fp32 scores per step to the end (B x T x V: ~20 GB at 64 x 512 x 152k):
    `hf_sample` never asks for it."""
    from klalign.generation.hf import hf_sample

    model, tokenizer = likely_to_stop
    asked = []
    generate = model.generate

    def spy(*a, generation_config=None, **k):
        asked.append((generation_config.output_scores, generation_config.output_logits))
        return generate(*a, generation_config=generation_config, **k)

    monkeypatch.setattr(model, "generate", spy)
    args = GenerationArguments(temperature=0.7, top_p=0.9, max_new_tokens=8, generation_batch_size=4)
    samples = hf_sample(model, tokenizer, ["Hi", "Describe the city."], 3, args, progress=False, sampler_logprobs=True)
    assert all(len(s.sampler_logprobs) == len(s.completion_ids) for s in samples)
    assert asked and all(not scores and not logits for scores, logits in asked)


def test_a_prompt_is_prefilled_once_for_its_samples(likely_to_stop):
    """n samples of a prompt: its KV cache is computed once and repeated over them (issue 22, item 1), so the
    model embeds each prompt's tokens but the last once, and the last one per sample (before: every row
    prefilled its whole prompt). `test_sampler_logprobs_equal_generates_processed_scores` checks the draws and
    log-probs against plain `generate`; a call that splits a prompt's samples takes the plain path."""
    from klalign.data.prompts import prompt_token_ids
    from klalign.generation.hf import hf_sample

    model, tokenizer = likely_to_stop
    prompts = ["How was the movie today, tell me?", "Hi there", [{"role": "user", "content": "Describe the city."}]]
    lengths = [len(prompt_token_ids(tokenizer, p)) for p in prompts]
    width = max(lengths)  # left-padded to the longest
    embedded = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: embedded.append(i[0].numel()))
    try:  # one new token: only prefill passes run
        hf_sample(model, tokenizer, prompts, 4, GenerationArguments(max_new_tokens=1, generation_batch_size=12),
                  progress=False)
        assert sum(embedded) == 3 * (width - 1) + 12 < 12 * width, embedded
        embedded.clear()
        hf_sample(model, tokenizer, prompts, 4, GenerationArguments(max_new_tokens=1, generation_batch_size=10),
                  progress=False)  # 10 rows, then 2: the first prompt's samples would span two calls
        assert embedded == [10 * width, 2 * lengths[2]], embedded
    finally:
        hook.remove()
