"""A causal LM whose outputs are closed over a fixed action set: the single-token test bed's architecture.

Why an architecture and not fitted weights. The test bed's policy pi(.|x) is the next-token
distribution at the end of a prompt restricted to K action tokens. A plain `LlamaForCausalLM` can only
make the other tokens unlikely with its weights (`klalign.testbed.model._fit_lm_head` puts them 20 nats
below the actions), and training may undo that: DPO's loss depends on the actions' log-ratio
differences only, so it is blind to a shift shared by all of a prompt's actions, and Adam on every
weight moved all action logits of one prompt from about 20 to about -6 in 9 steps, leaking 0.998 of
the prompt's mass to EOS (issue 15). No choice of weights can rule that out.

`ClosedActionLlamaForCausalLM` rules it out in the forward pass: the next token may be

- one of the `action_token_ids` after any other token (the end of a prompt), and
- only the `stop_token_id` (EOS) after an action, after EOS and after padding,

so every completion is [action, EOS]. The logits it returns are the log-probabilities restricted to the
allowed tokens (log_softmax of the Llama logits over them) and `CLOSED_LOGIT` everywhere else. The
allowed entries are log-probabilities, so their largest is at least -log K, and a closed token's
probability is at most e^(CLOSED_LOGIT + log K) = 0 in float32 whatever any weight holds: the action
set is closed under any training of any weight by construction. The allowed tokens' distribution is
exactly the plain model's softmax restricted to them, so log-probs, gradients and sampling are those
of the plain Llama with the non-action tokens removed. `CLOSED_LOGIT` is finite (not -inf) so that
p log p, entropies and softmaxes over the full vocabulary stay finite in TRL's and klalign's metrics.

It is a `LlamaForCausalLM` subclass with its own `PretrainedConfig` subclass (model type
`klalign_closed_llama`), registered with `AutoConfig` and `AutoModelForCausalLM` when this module is
imported (`import klalign` imports it), so `from_pretrained`, TRL's `DPOTrainer`, PEFT, klalign's
trainers, `generate` and `klalign.testbed.model.read_policy` use it unchanged. vLLM does not know the
architecture: the test bed can still be built as a plain Llama (`build_model(..., closed=False)`).
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

MODEL_TYPE = "klalign_closed_llama"
CLOSED_LOGIT = -1.0e4  # e^-1e4 underflows to 0 in float32 and bfloat16; finite, so p log p = 0, not NaN


@strict
class ClosedActionLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus the allowed output tokens: `action_token_ids` after a prompt, `stop_token_id`
    after an action (and after EOS or padding); `pad_token_id` is read from the Llama fields."""

    model_type = MODEL_TYPE

    action_token_ids: list[int] | None = None
    stop_token_id: int | None = None

    def validate_architecture(self):
        super().validate_architecture()
        actions = self.action_token_ids or []
        if not actions and self.stop_token_id is None:
            return  # the defaults (transformers builds one to diff against); the model refuses to run on it
        if len(actions) < 1 or self.stop_token_id is None:
            raise ValueError("ClosedActionLlamaConfig needs action_token_ids (>= 1) and stop_token_id")
        if self.stop_token_id in actions or len(set(actions)) != len(actions):
            raise ValueError("action_token_ids must be distinct and must not contain stop_token_id")
        if not all(0 <= t < self.vocab_size for t in [*actions, self.stop_token_id]):
            raise ValueError(f"allowed token ids must lie in [0, vocab_size={self.vocab_size})")


class ClosedActionLlamaForCausalLM(LlamaForCausalLM):
    """A Llama whose next token is an action after a prompt and EOS after an action (module docstring)."""

    config_class = ClosedActionLlamaConfig

    def allowed_next_tokens(self, previous: torch.Tensor) -> torch.Tensor:
        """Which tokens may follow each token of `previous`. (B, T) long -> (B, T, V) bool"""
        config, device = self.config, previous.device
        if not config.action_token_ids or config.stop_token_id is None:
            raise ValueError("ClosedActionLlamaConfig needs action_token_ids and stop_token_id to run the model")
        vocab = torch.zeros(2, config.vocab_size, dtype=torch.bool, device=device)  # row 0: actions, row 1: EOS
        actions = torch.tensor(config.action_token_ids, device=device)
        vocab[0, actions] = True
        vocab[1, config.stop_token_id] = True
        ends = [*config.action_token_ids, config.stop_token_id]
        if config.pad_token_id is not None:
            ends.append(config.pad_token_id)
        after_end = torch.isin(previous, torch.tensor(ends, device=device))  # (B, T)
        return vocab[after_end.long()]  # (B, T, V)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if input_ids is None:
            raise ValueError(f"{type(self).__name__} needs input_ids: the allowed next tokens depend on the last token")
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                              logits_to_keep=logits_to_keep, **kwargs)
        positions = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        allowed = self.allowed_next_tokens(input_ids[:, positions])  # (B, T, V)
        logits = out.logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)  # (B, T, V), -inf off the set
        logits = torch.where(allowed, logits, torch.full_like(logits, CLOSED_LOGIT))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` load `klalign_closed_llama` folders (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, ClosedActionLlamaConfig)
    except ValueError:  # already registered (a module reload)
        pass
    try:
        AutoModelForCausalLM.register(ClosedActionLlamaConfig, ClosedActionLlamaForCausalLM)
    except ValueError:
        pass


register()
