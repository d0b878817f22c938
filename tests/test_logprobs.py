"""Sequence log-probs against a naive full-softmax computation, and the KL estimators."""

import numpy as np
import torch

from klalign.models.tiny import build_causal_lm
from klalign.ops.kl import kl_k1, kl_k2, kl_k3
from klalign.ops.logprobs import sequence_logprobs, token_logprobs


def naive_sequence_logprobs(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (logp * completion_mask[:, 1:]).sum(dim=1)


def batch(tokenizer):
    prompts = ["How was the weather?", "Tell me about the city."]
    completions = [" It was great.", " Awful and dull, really bad!"]
    rows, masks = [], []
    for p, c in zip(prompts, completions):
        p_ids, c_ids = tokenizer(p).input_ids, tokenizer(c).input_ids
        rows.append(p_ids + c_ids)
        masks.append([0] * len(p_ids) + [1] * len(c_ids))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # right padding, as TRL collates
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    completion = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return input_ids, attention, completion


def test_sequence_logprobs_match_naive(tiny_tokenizer):
    model = build_causal_lm(tiny_tokenizer, seed=3)
    inputs = batch(tiny_tokenizer)
    ours = sequence_logprobs(model, *inputs)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, naive_sequence_logprobs(model, *inputs), atol=1e-5, rtol=0)
    per_token = token_logprobs(model, *inputs)
    assert (per_token[inputs[2][:, 1:] == 0] == 0).all()  # prompt and padding contribute nothing


def test_sequence_logprobs_carry_gradients(tiny_tokenizer):
    model = build_causal_lm(tiny_tokenizer, seed=3)
    sequence_logprobs(model, *batch(tiny_tokenizer)).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_kl_estimators_on_known_distributions():
    """E_pi[k1] = E_pi[k3] = KL(pi || ref) for exact samples; k3 >= 0 per sample."""
    pi, ref = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = (pi * (pi / ref).log()).sum()
    l = (pi / ref).log()  # log-ratio of each outcome
    assert torch.isclose((pi * kl_k1(l)).sum(), exact)
    assert torch.isclose((pi * kl_k3(l)).sum(), exact)
    assert (kl_k3(l) >= 0).all()
    assert torch.allclose(kl_k2(l), l**2 / 2)


def test_lean_logprobs_and_gradients_equal_the_full_logits_path(tiny_tokenizer):
    """The lean head (no (B, T, V) logits) gives the plain path's log-probs and gradients to 1e-5."""
    from peft import LoraConfig, get_peft_model

    inputs = batch(tiny_tokenizer)
    for make in (lambda: build_causal_lm(tiny_tokenizer, seed=3),
                 lambda: get_peft_model(build_causal_lm(tiny_tokenizer, seed=3),
                                        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))):
        grads = []
        for lean in (True, False):
            model = make()
            values = token_logprobs(model, *inputs, lean=lean)
            (values * torch.linspace(0.5, 2.0, values.shape[1])).sum().backward()  # position-dependent weights
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            if lean:
                lean_values = values.detach()
        torch.testing.assert_close(lean_values, values.detach(), atol=1e-5, rtol=0)
        for name in grads[1]:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_a_frozen_head_runs_once_per_position_through_forward_and_backward(tiny_tokenizer):
    """Under LoRA the head is frozen: the lean path forms each position's gradient in the forward, so a
    forward and backward call the head once per chunk (the checkpointed path: twice, forward and recomputation),
    with the plain path's gradients. A trained head keeps the checkpointed path."""
    from peft import LoraConfig, get_peft_model

    inputs = batch(tiny_tokenizer)
    for lora, calls_expected in ((True, 2), (False, 3)):
        model = build_causal_lm(tiny_tokenizer, seed=3)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        calls = []
        model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
        values = token_logprobs(model, *inputs)
        (values * torch.linspace(0.5, 2.0, values.shape[1])).sum().backward()
        # the model's own call (its last position, logits_to_keep=1), then the chunks': the tiny batch is one chunk
        assert len(calls) == calls_expected
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        plain = token_logprobs(model, *inputs, lean=False)
        (plain * torch.linspace(0.5, 2.0, plain.shape[1])).sum().backward()
        torch.testing.assert_close(values.detach(), plain.detach(), atol=1e-5, rtol=0)
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert grads[name].abs().sum() > 0
                torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4)


def test_lean_logprobs_follow_a_model_that_rewrites_its_logits():
    """The test bed's closed model rewrites the head's logits in its forward; the lean path (which applies the
    head itself) must not bypass that. After a step that moves mass off the actions in the plain head, the
    closed model's log-probs of [action, EOS] still sum to 1 over the actions, on either path."""
    from klalign.ops.batching import completion_batch
    from klalign.testbed.bandit import SingleTokenBandit
    from klalign.testbed.model import read_policy

    bandit = SingleTokenBandit.random(num_prompts=2, num_actions=4, seed=0)
    model = bandit.build_model(closed=True)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))  # the plain head now leaks mass
    tok = bandit.tokenizer
    prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in bandit.prompts for _ in bandit.actions]
    completions = [[a, tok.eos_token_id] for _ in bandit.prompts for a in bandit.action_token_ids]
    inputs = completion_batch(prompts, completions, tok.pad_token_id)
    lean = sequence_logprobs(model, **inputs, lean=True).view(2, 4).double()
    full = sequence_logprobs(model, **inputs, lean=False).view(2, 4).double()
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(lean.exp(), read_policy(model, bandit), atol=1e-5, rtol=0)
    torch.testing.assert_close(lean.exp().sum(1), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_shared_prompt_logprobs_equal_full_rows(tiny_tokenizer):
    """n completions of one prompt scored on one pass over the prompt (its KV cache repeated over them, in
    batches of 4) equal the plain path on n full rows to 1e-5 (measured 9.5e-7 on this model; SmolLM2 fp32:
    7.6e-5 over a 46-token sequence, the rounding of another computation order). An empty completion scores 0;
    the closed bed model (a head the lean path must not bypass) takes the plain path and agrees too."""
    from klalign.ops.batching import completion_batch
    from klalign.ops.logprobs import completion_logprobs, shared_prompt_token_logprobs
    from klalign.testbed.bandit import SingleTokenBandit

    bed = SingleTokenBandit.random(num_prompts=1, num_actions=4, seed=0)
    for model, pad in ((build_causal_lm(tiny_tokenizer, seed=3).eval(), tiny_tokenizer.pad_token_id),
                       (bed.build_model(closed=True).eval(), bed.tokenizer.pad_token_id)):
        g, high = torch.Generator().manual_seed(1), model.config.vocab_size
        prompt = torch.randint(3, high, (13,), generator=g).tolist()
        completions = [torch.randint(3, high, (n,), generator=g).tolist() for n in (7, 1, 12, 0, 12, 5)]
        shared = shared_prompt_token_logprobs(model, prompt, completions, pad, batch_size=4)  # (6, 12)
        with torch.no_grad():
            plain = token_logprobs(model, **completion_batch([prompt] * 6, completions, pad))[:, 12:24]
        assert shared.shape == (6, 12) and (shared[3] == 0).all()
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
        # Grouped by prompt, in order: two prompts' completions, each run on its own prompt's pass.
        rows = [type("C", (), {"prompt_ids": p, "completion_ids": c}) for p, c in
                [(prompt, completions[0]), (prompt, completions[1]), (prompt[:5], completions[2]), (prompt, completions[4])]]
        with torch.no_grad():
            expected = sequence_logprobs(model, **completion_batch([r.prompt_ids for r in rows],
                                                                   [r.completion_ids for r in rows], pad))
        # rtol: the closed model's -1e4 per off-action token makes the float32 sums ~1e5
        np.testing.assert_allclose(completion_logprobs(model, rows, pad, 2), expected.numpy(), atol=1e-4, rtol=1e-6)


def _pairs(high: int, pad: int, prompt_lengths, chosen_lengths, rejected_lengths, seed=2):
    """TRL's pair layout (chosen rows then rejected rows) of random tokens, and the prompts."""
    from klalign.ops.batching import completion_batch

    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, high, (n,), generator=g).tolist()  # noqa: E731
    prompts = [draw(n) for n in prompt_lengths]
    replies = [draw(n) for n in (*chosen_lengths, *rejected_lengths)]
    return completion_batch(prompts * 2, replies, pad), prompts, replies


def _logprobs_and_grads(model, batch, weights, **kwargs):
    model.zero_grad()
    out = token_logprobs(model, **batch, **kwargs)  # (2B, T-1)
    (out * weights).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_paired_logprobs_and_gradients_equal_one_row_per_reply(tiny_tokenizer):
    """Issue 22, item 1: each chosen/rejected pair scored as one row, its prompt once, the rejected reply masked
    from the chosen one and its positions restarted after the prompt. Log-probs and the gradients of a weighted
    sum of them equal the plain path's (one row per reply) to 1e-5 (measured, seeds 0-3: <= 1.4e-6 on log-probs, 9.5e-7 on gradients of size ~3),
    with SDPA and eager attention, through the lean head and the plain logits path (the closed bed model rewrites
    its logits). The model sees 3 packed rows of 28 instead of 6 rows of 24 (72 real tokens instead of 106)."""
    from klalign.testbed.bandit import SingleTokenBandit

    bed = SingleTokenBandit.random(num_prompts=1, num_actions=4, seed=0)
    cases = [(build_causal_lm(tiny_tokenizer, seed=3), tiny_tokenizer.pad_token_id, "sdpa"),
             (build_causal_lm(tiny_tokenizer, seed=3), tiny_tokenizer.pad_token_id, "eager"),
             (bed.build_model(closed=True), bed.tokenizer.pad_token_id, "sdpa")]
    for model, pad, attention in cases:
        model.set_attn_implementation(attention)
        model.eval()
        batch, _, _ = _pairs(model.config.vocab_size, pad, (13, 5, 16), (8, 1, 2), (7, 19, 1))
        weights = torch.rand(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1,
                             generator=torch.Generator().manual_seed(0))
        plain, plain_grads = _logprobs_and_grads(model, batch, weights)
        widths = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: widths.append(tuple(a[0].shape)))
        paired, paired_grads = _logprobs_and_grads(model, batch, weights, pairs=True)
        hook.remove()
        assert widths == [(3, 28)] and batch["input_ids"].shape == (6, 24)  # one forward, 3 x 28 < 6 x 24 tokens
        torch.testing.assert_close(paired, plain, atol=1e-5, rtol=0)
        assert len(paired_grads) == len(plain_grads) > 0
        for a, b in zip(paired_grads, plain_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_paired_logprobs_fall_back_to_one_row_per_reply_where_prompts_differ(tiny_tokenizer):
    """A pair whose two rows carry different prompts (TRL's keep_end truncation can cut them apart) cannot share
    one: the whole batch takes the plain path and gets the plain path's values."""
    from klalign.ops.batching import completion_batch, pack_pairs

    model = build_causal_lm(tiny_tokenizer, seed=3).eval()
    pad = tiny_tokenizer.pad_token_id
    _, prompts, replies = _pairs(model.config.vocab_size, pad, (6, 4), (3, 2), (2, 5))
    batch = completion_batch([prompts[0], prompts[1], prompts[0], prompts[0][1:]], replies, pad)
    assert pack_pairs(**batch) is None
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: widths.append(tuple(a[0].shape)))
    with torch.no_grad():
        paired = token_logprobs(model, **batch, pairs=True)
    hook.remove()
    assert widths == [tuple(batch["input_ids"].shape)]
    with torch.no_grad():
        torch.testing.assert_close(paired, token_logprobs(model, **batch), atol=0, rtol=0)


def test_a_frozen_bf16_head_gets_gradients_as_close_to_float64_as_the_checkpointed_path():
    """bf16 (the GPU configs' dtype): the frozen-head path's log-probs and hidden-state gradients are within 1.1x
    of the checkpointed path's error against float64 (measured: gradient 3.3e-3 relative against 3.6e-3)."""
    from klalign.ops import logprobs

    weight = torch.randn(5000, 64, generator=torch.Generator().manual_seed(0)) * 0.3  # (V, H)
    hidden = torch.randn(600, 64, generator=torch.Generator().manual_seed(1))  # (N, H): 3 chunks
    targets = torch.randint(0, 5000, (600,), generator=torch.Generator().manual_seed(2))

    def run(dtype, frozen_path: bool):
        head = torch.nn.Linear(64, 5000, bias=False).to(dtype).requires_grad_(False)
        head.weight.copy_(weight.to(dtype))
        h = hidden.to(dtype).requires_grad_(True)
        assert logprobs._frozen_plain_head(head)
        fused, logprobs._frozen_plain_head = logprobs._frozen_plain_head, lambda _: frozen_path
        try:
            values = logprobs._head_logprobs(head, h, targets)
        finally:
            logprobs._frozen_plain_head = fused
        (values * torch.linspace(0.5, 2.0, 600)).sum().backward()
        return values.detach().double(), h.grad.double()

    exact_values, exact_grad = run(torch.float64, False)
    errors = {}
    for frozen_path in (False, True):
        values, grad = run(torch.bfloat16, frozen_path)
        errors[frozen_path] = ((values - exact_values).abs().max(), (grad - exact_grad).norm() / exact_grad.norm())
    assert errors[True][0] <= 1.1 * errors[False][0] and errors[True][1] <= 1.1 * errors[False][1], errors
