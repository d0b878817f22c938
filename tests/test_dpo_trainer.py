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


def ranked_bed_pairs(bandit, n: int, seed: int) -> Dataset:
    """n pairs of distinct pi_ref draws on the bed, the higher reward chosen (RSO's `pair_by_reward`), rewards kept."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(n) % bandit.ref.shape[0]
    a, b = (torch.multinomial(bandit.ref[c], 1, generator=g).squeeze(1) for _ in range(2))
    c, a, b = c[a != b], a[a != b], b[a != b]
    table = bandit.reward_table()
    ra, rb = table[c, a], table[c, b]
    win = ra > rb
    return Dataset.from_dict({
        "prompt": [bandit.prompts[i] for i in c],
        "chosen": [bandit.actions[i] for i in torch.where(win, a, b)],
        "rejected": [bandit.actions[i] for i in torch.where(win, b, a)],
        "chosen_reward": torch.where(win, ra, rb).tolist(), "rejected_reward": torch.where(win, rb, ra).tolist(),
    })


@pytest.mark.parametrize("pair_labels", ["expected", "drawn"])
def test_reward_ranked_pairs_reach_the_tilt_only_with_expected_labels(pair_labels, tmp_path):
    """Issue 19: offline DPO on ~170 reward-ranked pairs of pi_ref samples (4 prompts x 6 actions, beta 1, 10
    epochs). With the loss averaged over each pair's Bradley-Terry label sigmoid(r_c - r_r) it lands on the tilt:
    KL(pi || pi*) 0.00095-0.038 over seeds 0-4 (seed 3's pairs leave one comparison thin), KL to pi_ref 0.155-0.172
    against the tilt's 0.157. With the chosen response taken as certainly preferred (TRL's DPO; the only behaviour
    before `pair_labels`) it overshoots: KL(pi || pi*) 0.84-1.09, KL to pi_ref 1.28-1.74. Bars 0.1 and 0.5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from klalign.testbed.bandit import SingleTokenBandit
    from klalign.testbed.metrics import exact_metrics
    from klalign.testbed.model import read_policy

    bandit = SingleTokenBandit.random(num_prompts=4, num_actions=6, seed=0)
    bandit.save(tmp_path / "bed")
    load = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "bed")  # noqa: E731
    args = DPOConfig(output_dir=str(tmp_path / "out"), beta=1.0, learning_rate=1e-2, num_train_epochs=10,
                     per_device_train_batch_size=64, lr_scheduler_type="cosine", precompute_ref_log_probs=True,
                     use_cpu=True, report_to=[], save_strategy="no", seed=0, pair_labels=pair_labels)
    policy = load()
    DPOTrainer(model=policy, ref_model=load(), args=args, train_dataset=ranked_bed_pairs(bandit, 256, seed=0),
               processing_class=AutoTokenizer.from_pretrained(tmp_path / "bed")).train()
    metrics = exact_metrics(read_policy(policy, bandit).numpy(), bandit, 1.0)
    tilt_kl = exact_metrics(bandit.optimal_policy(1.0).numpy(), bandit, 1.0)["testbed/kl_to_ref"]
    if pair_labels == "expected":
        assert metrics["testbed/kl_to_optimum"] < 0.1 and metrics["testbed/kl_to_ref"] < 2 * tilt_kl, metrics
    else:
        assert metrics["testbed/kl_to_optimum"] > 0.5 and metrics["testbed/kl_to_ref"] > 2 * tilt_kl, metrics


def test_expected_labels_need_probabilities_or_rewards(pairs, tiny_tokenizer, tmp_path):
    """A dataset of labels only cannot say how sure each label is: refused before training, naming the columns."""
    with pytest.raises(ValueError, match="preference_prob.*chosen_reward.*rejected_reward"):
        DPOTrainer(model=build_causal_lm(tiny_tokenizer), args=config(DPOConfig, tmp_path, pair_labels="expected"),
                   train_dataset=pairs, processing_class=tiny_tokenizer)


def test_expected_labels_refuse_a_stream_without_known_columns(pairs):
    """An IterableDataset whose columns are unknown gets the named error, not a TypeError from `None`."""
    from klalign.trainers.dpo import with_label_probabilities

    stream = pairs.to_iterable_dataset().map(lambda row: row)  # a map hides the columns: column_names is None
    assert stream.column_names is None
    with pytest.raises(ValueError, match="preference_prob.*chosen_reward"):
        with_label_probabilities(stream)


def test_shared_prompts_train_the_same_weights_on_fewer_tokens(pairs, tiny_tokenizer, tmp_path):
    """Issue 22, item 1: with `share_prompt` (the default) each pair's prompt runs once, in the policy's pass with
    gradients and in the reference's (the LoRA base), so the model sees fewer tokens; 6 LoRA steps at lr 1e-2 end
    on the same weights as one row per reply, to float rounding (measured: 2.6e-7 on LoRA B weights of size 0.03;
    1424 tokens through the embedding instead of 1792)."""
    from peft import LoraConfig

    weights, tokens = {}, {}
    for share in (True, False):
        trainer = DPOTrainer(
            model=build_causal_lm(tiny_tokenizer, seed=0),
            args=config(DPOConfig, tmp_path / str(share), max_steps=6, learning_rate=1e-2, share_prompt=share),
            train_dataset=pairs,
            processing_class=tiny_tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        seen = []
        trainer.model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].numel()))
        trainer.train()
        weights[share] = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
        tokens[share] = sum(seen)
    assert tokens[True] < 0.85 * tokens[False], tokens
    assert weights[True].keys() == weights[False].keys() and len(weights[True]) > 0
    for k in weights[True]:
        torch.testing.assert_close(weights[True][k], weights[False][k], atol=1e-5, rtol=1e-4)
