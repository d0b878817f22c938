"""Issue 22: a grouped-query model loaded by klalign runs SDPA with its K/V heads grouped on CPU
(`klalign.ops.attention.GROUPED_SDPA`) and computes what transformers' "sdpa" computes: logits, gradients,
packed pairs' log-probs and sampled tokens, on left-padded rows (the masked case transformers repeats K/V for)."""

import numpy as np
import torch

from klalign.generation.hf import hf_sample
from klalign.generation.types import GenerationArguments
from klalign.models.loading import load_causal_lm, load_tokenizer
from klalign.ops.attention import GROUPED_SDPA
from klalign.ops.batching import completion_batch, left_padded
from klalign.ops.logprobs import sequence_logprobs

PROMPTS = ["Hi", "How was the movie today, tell me?", [{"role": "user", "content": "Describe the city."}]]


def key_heads_seen(model, run) -> list[int]:
    """The K/V head count of every SDPA kernel call while `run()` runs."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        seen.append(key.size(1))
        return sdpa(query, key, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        run()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return seen


def test_grouped_sdpa_equals_sdpa_without_repeating_kv_heads(tiny_policy_dir):
    model, tokenizer = load_causal_lm(str(tiny_policy_dir)), load_tokenizer(str(tiny_policy_dir))
    config = model.config
    assert config._attn_implementation == GROUPED_SDPA and config.num_key_value_heads < config.num_attention_heads
    enc = left_padded([tokenizer("Hi").input_ids, tokenizer("How was the movie today, tell me?").input_ids],
                      tokenizer.pad_token_id, "cpu")
    assert (enc["attention_mask"] == 0).any()  # a mask: the case transformers' "sdpa" repeats K/V heads for
    results = {}
    for impl in ("sdpa", GROUPED_SDPA):
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = {}
        heads = key_heads_seen(model, lambda: out.update(logits=model(**enc).logits))  # noqa: B023
        out["logits"][enc["attention_mask"].bool()].square().sum().backward()
        results[impl] = (out["logits"].detach(), [p.grad.clone() for p in model.parameters()], set(heads))
    (plain, plain_grads, plain_heads), (grouped, grouped_grads, grouped_heads) = results.values()
    assert plain_heads == {config.num_attention_heads} and grouped_heads == {config.num_key_value_heads}
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(grouped[mask], plain[mask], rtol=0, atol=1e-5)
    for a, b in zip(grouped_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_sdpa_samples_and_scores_pairs_as_sdpa(tiny_policy_dir):
    """The same seeded draws and sampler log-probs through generate's KV cache, and the same log-probs of
    packed pairs (a custom 4-D mask reaches the grouped path: `share_prompt` stays on)."""
    model, tokenizer = load_causal_lm(str(tiny_policy_dir), trainable=False), load_tokenizer(str(tiny_policy_dir))
    args = GenerationArguments(max_new_tokens=12, generation_batch_size=6)
    draws, pair_logps = {}, {}
    for impl in ("sdpa", GROUPED_SDPA):
        model.set_attn_implementation(impl)
        torch.manual_seed(0)
        draws[impl] = hf_sample(model, tokenizer, PROMPTS, 2, args, progress=False, sampler_logprobs=True)
        pairs = draws["sdpa"][0::2] + draws["sdpa"][1::2]  # TRL's layout: chosen rows, then a prompt's other sample
        batch = completion_batch([c.prompt_ids for c in pairs], [c.completion_ids for c in pairs],
                                 tokenizer.pad_token_id)
        rows_seen = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows_seen.append(i[0].size(0)))
        pair_logps[impl] = sequence_logprobs(model, **batch, pairs=True)
        hook.remove()
        assert rows_seen == [len(PROMPTS)]  # one packed row per pair, under either attention
    for a, b in zip(draws["sdpa"], draws[GROUPED_SDPA], strict=True):
        assert a.completion_ids == b.completion_ids
        np.testing.assert_allclose(a.sampler_logprobs, b.sampler_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(pair_logps[GROUPED_SDPA], pair_logps["sdpa"], rtol=0, atol=1e-4)

