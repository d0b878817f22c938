"""The weights pushed into a vLLM engine (`hf_weights`, a plain generator: no vLLM needed).

A LoRA policy is pushed merged out of place: after 100 pushes of a bf16 model the base weights (pi_ref)
are bit-identical, and each pushed LoRA weight is W + s BA computed in fp32 and rounded once, which is
also PEFT's own merge done in fp32. PEFT's in-place merge/unmerge, which the push used before, changes
the bf16 base weights (TRL issue #6688). The pushed names and values reproduce the PEFT model's logits
in a plain model; only the active adapter is merged, none while adapters are disabled; layers that
cannot be merged exactly are refused by name.
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from klalign.generation.vllm_engine import hf_weights
from klalign.models.tiny import build_causal_lm, build_tokenizer

PREFIX = "base_model.model."


def with_random_b(peft_model, seed: int = 1, std: float = 0.02):
    """LoRA's B starts at zero (the adapter is off); a trained one is not: B ~ N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return peft_model


def bf16_lora(target_modules="all-linear", **config):
    model = build_causal_lm(build_tokenizer()).to(torch.bfloat16)
    return with_random_b(get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules, **config)))


def hf_name(peft_name: str) -> str:
    return peft_name.removeprefix(PREFIX).replace(".base_layer", "")


def peft_fp32_merge(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own merge on an fp32 copy, under HF names."""
    merged = copy.deepcopy(peft_model).float()
    merged.merge_adapter()
    return {hf_name(n): p.detach() for n, p in merged.named_parameters() if "lora_" not in n}


def test_a_hundred_bf16_pushes_leave_the_base_weights_bit_identical():
    model = bf16_lora()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(100):
        pushed = dict(hf_weights(model))  # consumed fully, as vLLM's reload does
    changed = {n: (p != before[n]).float().mean().item() for n, p in model.named_parameters()
               if not torch.equal(p, before[n])}
    assert not changed, f"a push changed the training weights (fraction of entries changed): {changed}"

    lora_layers = {n.removesuffix(".lora_A.default.weight") for n in before if n.endswith("lora_A.default.weight")}
    assert lora_layers and all(model.get_submodule(n).scaling["default"] == 2.0
                               for n in lora_layers)
    reference = peft_fp32_merge(model)
    for layer in lora_layers:
        w = before[f"{layer}.base_layer.weight"]
        a, b = before[f"{layer}.lora_A.default.weight"], before[f"{layer}.lora_B.default.weight"]
        expected = (w.float() + 2.0 * (b.float() @ a.float())).to(torch.bfloat16)  # W + s BA in fp32, rounded once
        got = pushed[hf_name(layer) + ".weight"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected), layer
        assert torch.equal(got, reference[hf_name(layer) + ".weight"].to(torch.bfloat16)), layer
        assert not torch.equal(got, w)  # the adapter is in it
        assert got.data_ptr() != w.data_ptr()  # a new tensor, not the training weight
    # every other weight is pushed as it is, under the base model's own names
    plain = {n: p for n, p in before.items() if "lora_" not in n and ".base_layer." not in n}
    assert all(torch.equal(pushed[hf_name(n)], p) for n, p in plain.items())
    assert list(pushed) == [n for n, _ in build_causal_lm(build_tokenizer()).named_parameters()]


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_pushed_weights_give_the_peft_models_logits_in_a_plain_model():
    """Names, tied head, modules_to_save and a LoRA embedding layer: a plain (untied) Llama loaded with the
    pushed weights computes what the PEFT model computes."""
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = with_random_b(get_peft_model(base, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["norm"])))
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)  # the trained copy differs
    pushed = dict(hf_weights(model))
    assert "lm_head.weight" in pushed and not any("lora_" in n or "modules_to_save" in n or "original_module" in n
                                                  for n in pushed)
    plain = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False}))
    assert sorted(plain.state_dict()) == sorted(pushed)
    plain.load_state_dict(pushed)
    ids = torch.randint(0, config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():  # the base (pi_ref): no adapter merged, the original modules pushed
            off = dict(hf_weights(model))
            plain.load_state_dict(off)
            torch.testing.assert_close(plain(ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(off["model.norm.weight"], torch.ones(config.hidden_size))
    q_proj = base.model.layers[0].self_attn.q_proj
    assert torch.equal(off["model.layers.0.self_attn.q_proj.weight"], q_proj.base_layer.weight)


def test_only_the_active_adapter_is_merged():
    model = bf16_lora(target_modules=["q_proj"])
    model.add_adapter("other", LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj"]))
    with_random_b(model, seed=7)  # both adapters' B
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.float()

    def expected(adapter):
        a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
        return (w + layer.scaling[adapter] * (b @ a)).to(torch.bfloat16)

    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(dict(hf_weights(model))[name], expected("default"))
    model.set_adapter("other")
    assert torch.equal(dict(hf_weights(model))[name], expected("other"))


def test_fan_in_fan_out_layers_are_merged_like_peft():
    """GPT-2's Conv1D stores W as (in, out): PEFT's fan_in_fan_out transposes BA."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).to(torch.bfloat16)
    model = with_random_b(get_peft_model(gpt2, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                          fan_in_fan_out=True)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pushed = dict(hf_weights(model))
    reference = peft_fp32_merge(model)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert pushed[name].shape == reference[name].shape
        assert torch.equal(pushed[name], reference[name].to(torch.bfloat16)), name
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_layers_it_cannot_merge_exactly_are_refused_by_name():
    model = bf16_lora(target_modules=["q_proj"], use_dora=True)
    with pytest.raises(NotImplementedError, match=r"model\.layers\.0\.self_attn\.q_proj.*DoraLinearVariant"):
        list(hf_weights(model))
