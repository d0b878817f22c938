"""klalign.DPOTrainer: drop-in for trl.DPOTrainer, same losses, trains, LoRA reference, clear config errors."""

import pytest
import torch
import trl
from datasets import Dataset

from klalign import DPOConfig, DPOTrainer
from klalign.models.tiny import build_causal_lm
from klalign.testbed.positivity import positivity_preferences


@pytest.fixture(scope="module")
def pairs():
    return Dataset.from_list(positivity_preferences(24, seed=5))


def config(cls, tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path), beta=0.3, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        bf16=False, use_cpu=True, report_to=[], gradient_checkpointing=False, max_length=64, seed=0,
    )
    return cls(**{**base, **overrides})


def distinct_reference(tokenizer):
    """A reference far from the policy, so log-ratios (and the losses) are far from their values at 0."""
    reference = build_causal_lm(tokenizer, seed=1)
    with torch.no_grad():
        reference.lm_head.weight.mul_(8.0)
    return reference


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "sigmoid_norm"])
def test_eval_loss_equals_trl(loss_type, pairs, tiny_tokenizer, tmp_path):
    results = {}
    for name, trainer_cls, config_cls in [("trl", trl.DPOTrainer, trl.DPOConfig), ("klalign", DPOTrainer, DPOConfig)]:
        trainer = trainer_cls(
            model=build_causal_lm(tiny_tokenizer, seed=0),
            ref_model=distinct_reference(tiny_tokenizer),
            args=config(config_cls, tmp_path / name, loss_type=loss_type),
            train_dataset=pairs,
            eval_dataset=pairs,
            processing_class=tiny_tokenizer,
        )
        results[name] = trainer.evaluate()
    assert abs(results["trl"]["eval_loss"] - results["klalign"]["eval_loss"]) < 1e-5
    assert abs(results["klalign"]["eval_loss"] - {"sigmoid": 0.693, "hinge": 1.0}.get(loss_type, -1)) > 0.05
    for key in ["eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/accuracies"]:
        assert results["klalign"][key] == pytest.approx(results["trl"][key], abs=1e-5)


def test_training_moves_policy_toward_chosen(pairs, tiny_tokenizer, tmp_path):
    policy = build_causal_lm(tiny_tokenizer, seed=0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    trainer = DPOTrainer(
        model=policy,
        ref_model=build_causal_lm(tiny_tokenizer, seed=0),
        args=config(DPOConfig, tmp_path, max_steps=12, learning_rate=5e-3, logging_steps=1),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tiny_tokenizer,
    )
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert start["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert end["eval_loss"] < start["eval_loss"] - 0.05
    assert end["eval_rewards/margins"] > 0
    logged = trainer.state.log_history[0]
    assert {"loss", "rewards/chosen", "rewards/margins", "rewards/accuracies"} <= set(logged)


def test_lora_reference_is_the_disabled_adapter(pairs, tiny_tokenizer, tmp_path):
    from peft import LoraConfig

    trainer = DPOTrainer(
        model=build_causal_lm(tiny_tokenizer, seed=0),
        args=config(DPOConfig, tmp_path, max_steps=6, learning_rate=1e-2),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tiny_tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None  # no second copy of the weights
    assert trainer.evaluate()["eval_loss"] == pytest.approx(0.6931, abs=1e-4)
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < 0.69


def test_precomputed_reference_gives_the_same_loss(pairs, tiny_tokenizer, tmp_path):
    losses = []
    for precompute in (False, True):
        trainer = DPOTrainer(
            model=build_causal_lm(tiny_tokenizer, seed=0),
            ref_model=distinct_reference(tiny_tokenizer),
            args=config(DPOConfig, tmp_path / str(precompute), precompute_ref_log_probs=precompute),
            train_dataset=pairs,
            eval_dataset=pairs,
            processing_class=tiny_tokenizer,
        )
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(loss_type="kto"), "loss_type 'kto' is not supported"),
        (dict(loss_type=["sigmoid", "hinge"]), "loss_type takes one loss"),
        (dict(f_divergence_type="forward_kl"), "reverse-KL only"),
        (dict(label_smoothing=0.1), "label_smoothing"),
    ],
)
def test_bad_config_is_named(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(DPOConfig, tmp_path, **overrides)


def test_rejects_trl_config(tiny_tokenizer, pairs, tmp_path):
    with pytest.raises(TypeError, match="klalign.DPOConfig"):
        DPOTrainer(model=build_causal_lm(tiny_tokenizer), args=config(trl.DPOConfig, tmp_path),
                   train_dataset=pairs, processing_class=tiny_tokenizer)


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_by_default_including_attention_rates_trl_misses(pairs, tiny_tokenizer, tmp_path, disable):
    """`disable_dropout` (TRL's default, true) turns off the policy's and the reference's Llama attention
    dropout, a float rate TRL's own pass leaves at 0.1: two training-mode forward passes then agree exactly."""
    def with_dropout(model):
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.1
        return model

    trainer = DPOTrainer(model=with_dropout(build_causal_lm(tiny_tokenizer, seed=0)),
                         ref_model=with_dropout(distinct_reference(tiny_tokenizer)),
                         args=config(DPOConfig, tmp_path, disable_dropout=disable), train_dataset=pairs,
                         processing_class=tiny_tokenizer)
    rates = [m.attention_dropout for model in (trainer.model, trainer.ref_model) for m in model.modules()
             if hasattr(m, "attention_dropout")]
    assert rates and all(rate == (0.0 if disable else 0.1) for rate in rates)
    ids = torch.tensor([tiny_tokenizer("How was the trip? It was lovely.").input_ids])
    trainer.model.train()
    with torch.no_grad():
        first, second = (trainer.model(input_ids=ids).logits for _ in range(2))
    assert torch.equal(first, second) == disable
