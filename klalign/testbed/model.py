"""The single-token test bed's tokenizer and model: build a tiny Llama whose policy is an exact table,
and read that policy back (`klalign.testbed` holds the tables, the bandit and its oracles).

The action set is closed by construction (`closed=True`, the default): see `klalign.testbed.closed_actions`.

How the reference policy is set exactly: build the model at random (with orthogonal token
embeddings, so that different prompts end in nearly orthogonal hidden states), read the final
hidden states at the end of each prompt and after each prompt + action, then solve the untied
lm_head so that the logits there are log ref on the actions (exactly), NON_ACTION_GAP lower on
every other token, and EOS ahead of every other token after an action.
"""

from __future__ import annotations

import math

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from klalign.testbed.closed_actions import (
    ClosedActionLlamaConfig,
    ClosedActionLlamaForCausalLM,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
NON_ACTION_GAP = 20.0  # off-action mass <= (V - K) * e^-20; wider means larger logits, more float32 rounding
POLICY_ATOL = 1e-5  # how far the built model's policy may be from `ref` (float32 logits: ~1e-6 seen)

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



# ----------------------------------------------------------------------------- the model


def _input_ids(tokenizer, texts: list[str], device) -> torch.Tensor:
    """Token ids of equal-length texts (every test-bed prompt has 3 tokens), no padding. (N, L)"""
    return tokenizer(texts, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def _fit_lm_head(model: LlamaForCausalLM, bandit) -> None:
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
    bandit, seed: int = 0, hidden_size: int | None = None, num_layers: int = 2,
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


def read_policy(model, bandit) -> torch.Tensor:
    """The model's exact policy over the actions at every prompt. (C, K) float64

    Full-vocabulary softmax restricted to the action tokens (not renormalised: see
    `off_action_mass`). Works for any causal LM over the test-bed vocabulary, PEFT-wrapped too.
    """
    logp = _next_token_logprobs(model, bandit.tokenizer, bandit.prompts)  # (C, V)
    return logp[:, bandit.action_token_ids].exp()


def off_action_mass(model, bandit) -> torch.Tensor:
    """Probability of a non-action token at the end of each prompt. (C,) float64"""
    return 1 - read_policy(model, bandit).sum(-1)


def eos_after_action(model, bandit) -> torch.Tensor:
    """Probability that EOS follows each action, i.e. that a completion is [action, EOS]. (C, K)"""
    texts = [p + a for p in bandit.prompts for a in bandit.actions]
    logp = _next_token_logprobs(model, bandit.tokenizer, texts)  # (C*K, V)
    return logp[:, bandit.tokenizer.eos_token_id].exp().view(bandit.num_prompts, bandit.num_actions)


@torch.no_grad()
def sample_actions(model, bandit, num_samples: int, seed: int = 0) -> torch.Tensor:
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
