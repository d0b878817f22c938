"""The reference policy pi_ref, in one place (ALGORITHMS.md, Notation: every KL in klalign is to pi_ref).

pi_ref takes one of two forms behind one interface:

- a separate frozen model (`ref_model`), prepared for inference on the trainer's accelerator by
  `klalign.models.placement.prepare_frozen` (under DeepSpeed wrapped as TRL wraps its reference and reward
  models: sharded with ZeRO-3, so every process must call it equally often);
- with LoRA and no `ref_model`, the policy itself with its adapter disabled: the base weights are
  held once (TRL's convention; `adapter_name` selects a named reference adapter instead).

Every trainer and enhancer that needs pi_ref (log-probs for the KL terms, samples for win rates, the
mixture of Nash-MD, hidden states for features) goes through `Reference`, so the ZeRO-3 handling
(gather for generation, lockstep forward passes) is written once.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.utils import is_peft_model

from klalign.models.placement import gathered_for_generation
from klalign.ops.logprobs import token_logprobs
from klalign.ops.modules import evaluation_mode


class Reference:
    """pi_ref for a trainer whose (wrapped) policy is passed to each call.

    `policy` is the model as the trainer runs it (`trainer.model_wrapped`: DDP, a DeepSpeed engine or
    the plain module); with a frozen `ref_model` it is only used to find the device.
    """

    def __init__(self, ref_model, accelerator, adapter_name: str | None = None):
        self.ref_model = ref_model
        self.accelerator = accelerator
        self.adapter_name = adapter_name

    @property
    def is_adapter_disabled_policy(self) -> bool:
        return self.ref_model is None

    def _adapter_off(self, policy):
        """The policy's PEFT model with the reference adapter active (None: every adapter disabled)."""
        from trl.trainer.utils import use_adapter  # private: klalign.internals

        return use_adapter(self.accelerator.unwrap_model(policy), adapter_name=self.adapter_name)

    @contextlib.contextmanager
    def forward_model(self, policy):
        """A model whose forward pass is pi_ref's (HF keyword arguments), for log-probs and hidden states.

        With neither a frozen model nor an adapter, the policy itself (DPO's precomputed reference
        log-probs, taken before any step; the online trainers refuse that combination)."""
        if self.ref_model is not None:
            yield self.ref_model
        elif not is_peft_model(self.accelerator.unwrap_model(policy)):
            yield policy
        else:
            with self._adapter_off(policy):
                yield policy

    @torch.no_grad()
    def token_logprobs(self, policy, batch: dict[str, torch.Tensor], pairs: bool = False) -> torch.Tensor:
        """Per-token log pi_ref of the completion tokens, zero elsewhere, in eval mode (a disabled adapter leaves
        the base model's own dropout, which must not run here). `pairs`: `klalign.ops.logprobs.token_logprobs`.
        (B, T) -> (B, T-1)"""
        with self.forward_model(policy) as model, evaluation_mode(model):
            return token_logprobs(model, **batch, pairs=pairs)

    def sequence_logprobs(self, policy, batch: dict[str, torch.Tensor], pairs: bool = False) -> torch.Tensor:
        """`s_ref(y)`, the summed log pi_ref of each completion. (B,)"""
        return self.token_logprobs(policy, batch, pairs).sum(dim=1)

    @contextlib.contextmanager
    def generation_model(self, policy):
        """pi_ref as a plain module to call `generate` on, ZeRO-3 parameters gathered once for the block
        (not layer by layer at every decoding step)."""
        if self.ref_model is not None:
            with gathered_for_generation(self.ref_model, self.accelerator) as unwrapped:
                yield unwrapped
            return
        with gathered_for_generation(policy, self.accelerator) as unwrapped, self._adapter_off(policy):
            yield unwrapped

    @contextlib.contextmanager
    def mixture_partner(self, unwrapped_policy):
        """pi_ref as a forward callable beside a policy already gathered for generation (Nash-MD's
        token-level mixture): the gathered frozen model, or the same module with its adapter off per call."""
        if self.ref_model is not None:
            with gathered_for_generation(self.ref_model, self.accelerator) as unwrapped:
                yield unwrapped
            return
        from trl.trainer.utils import use_adapter  # private: klalign.internals

        def forward(**kwargs):
            with use_adapter(unwrapped_policy, adapter_name=self.adapter_name):
                return unwrapped_policy(**kwargs)

        yield forward
