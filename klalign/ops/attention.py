"""transformers' SDPA attention with grouped K/V heads left grouped on CPU (issue 22: where the time goes).

A grouped-query model (SmolLM2: 9 query heads, 3 K/V heads) computes its attention through transformers'
`sdpa_attention_forward`. Wherever a mask is given (every left-padded generation step, every padded or
packed training row) transformers repeats each K/V head to the query heads' count first (`repeat_kv`: a
copy of the whole K/V, or of the whole KV cache at every decoding step), because CUDA's SDPA kernels fall back
to the math kernel for masked GQA. torch's CPU kernel takes grouped heads with a mask as they are
(`enable_gqa=True`), with the same result: measured on SmolLM2's shapes, 1.8-3.1 ms -> 0.4-0.6 ms a layer a
decoding step of 32 rows, 24 -> 16 ms a training row batch's forward (bench/online_vs_trl.py has the
round-level share).

`GROUPED_SDPA` is registered with transformers' public `AttentionInterface` and `AttentionMaskInterface`
(masks built exactly as for "sdpa"); `use_grouped_sdpa` switches a loaded model to it with the public
`set_attn_implementation`. Off CPU, without a mask, or with anything this path does not take (paged cache,
position bias, attention weights asked for), it calls transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from klalign.ops.modules import base_model

GROUPED_SDPA = "klalign_sdpa"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """(B, H, Tq, D) query, (B, H_kv, Tk, D) key and value -> ((B, Tq, H, D) output, None), as `sdpa_attention_forward`."""
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = (attention_mask is None or not grouped or query.device.type != "cpu" or kwargs.get("cache") is not None
             or kwargs.get("position_bias") is not None or kwargs.get("output_attentions", False))
    if plain:  # transformers' own path (without a mask it passes enable_gqa itself)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # With a mask transformers never sets is_causal: the mask carries the causal pattern.
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def use_grouped_sdpa(model):
    """Switch a model whose attention is transformers' "sdpa" to `GROUPED_SDPA` (same results; on CPU without
    repeating K/V heads); any other attention (eager, FlashAttention, flex) is left as it is. Returns the model."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(GROUPED_SDPA)
    return model
