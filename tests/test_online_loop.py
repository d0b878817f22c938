"""The online loop at the settings users run: log-probs that must be exact are taken without dropout, the
learning-rate schedule lasts exactly as long as the run, and a diverging run stops with one line."""

import logging
import math

import pytest
import torch
from peft import LoraConfig
from test_iterative_dpo import make_trainer as make_iterative
from transformers import PrinterCallback, TrainerCallback

from klalign import DivergenceError, OptimisticKLConfig, OptimisticKLTrainer
from klalign.ops.importance import at_scored_positions
from klalign.ops.kl import kl_k3
from klalign.ops.logprobs import token_logprobs
from klalign.oracles.base import BradleyTerryPreference
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward
from klalign.trainers.features import TabularFeatures


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bandit = SingleTokenBandit.random(num_prompts=4, num_actions=6, seed=0)
    folder = tmp_path_factory.mktemp("bed")
    bandit.save(folder)
    return bandit, folder


# ----------------------------------------------------------------------------- dropout


def with_attention_dropout(model, rate: float):
    """Llama reads its attention dropout from a float on each attention layer (no nn.Dropout module)."""
    model.config.attention_dropout = rate
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = rate
    return model


class SelfKL(TrainerCallback):
    """After every round: k3 of the policy against itself (two no-grad log-prob passes of one batch) and of
    the reference (the disabled adapter: the base model's own dropout) against itself."""

    def __init__(self):
        self.trainer, self.history = None, []

    def on_log(self, args, state, control, **kwargs):
        t = self.trainer
        bandit = t.bandit
        prompts = [t.processing_class(p).input_ids for p in bandit.prompts for _ in range(8)]
        actions = [[bandit.action_token_ids[i % bandit.num_actions], t.processing_class.eos_token_id]
                   for i in range(len(prompts))]
        batch = t.batch(prompts, actions)
        policy = [t.frozen_policy_token_logprobs(batch).sum(1) for _ in range(2)]
        reference = [t.reference.token_logprobs(t.model_wrapped, batch).sum(1) for _ in range(2)]
        self.history.append((kl_k3(policy[0] - policy[1]).max().item(),
                             kl_k3(reference[0] - reference[1]).max().item(), t.model_wrapped.training))


@pytest.mark.parametrize("disable", [True, False])
def test_log_probs_that_must_be_exact_see_no_dropout(bed, tmp_path, disable):
    """LoRA with lora_dropout 0.1 on a model with attention dropout 0.1, the reference its disabled adapter.
    In every round (not only round 0, before the first update puts the model in train mode): k3 of the
    policy against itself and of the reference against itself is exactly 0 (no-grad log-probs in eval
    mode), and, with dropout off (the default, as TRL), the first PPO ratio of each round is 1 (to the float
    rounding of the sampler's computation order: at temperature 1 pi_old is the sampler's own log-prob, issue 22,
    item 2; exactly 1 when it was a frozen pass of the same batch)."""
    bandit, folder = bed
    spy = SelfKL()
    args = OptimisticKLConfig(
        output_dir=str(tmp_path), beta=0.5, num_rounds=3, prompts_per_round=4, prompts_per_chunk=4,
        samples_per_prompt=4, per_device_train_batch_size=8, max_new_tokens=1, learning_rate=0.05,
        lr_scheduler_type="constant", use_cpu=True, report_to="none", seed=0, disable_dropout=disable,
    )
    trainer = OptimisticKLTrainer(
        model=with_attention_dropout(bandit.build_model(), 0.1), ref_model=None, args=args,
        train_dataset=bandit.prompt_dataset(), processing_class=bandit.tokenizer, oracle=TestbedReward(bandit),
        feature_map=TabularFeatures(torch.eye(24).view(4, 6, 24), bandit.prompts, bandit.actions), callbacks=[spy],
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.bandit, spy.trainer = bandit, trainer
    first_ratios, loss_fn = [], trainer._policy_loss

    def first_ratio(rows, advantages, ref):
        if len(first_ratios) < trainer.clock.round_index + 1:  # the round's first mini-batch
            batch = trainer._sample_batch(rows)
            with torch.no_grad():
                logps = token_logprobs(trainer.model_wrapped, **batch)  # as the loss takes them: train mode
            old = at_scored_positions([t for row in rows for t in row["token_logprobs"]], batch["completion_mask"])
            mask = batch["completion_mask"][:, 1:].bool()
            first_ratios.append((logps.double() - old)[mask].exp())
        return loss_fn(rows, advantages, ref)

    trainer._policy_loss = first_ratio
    trainer.train()
    assert len(spy.history) == 3 and all(training for *_, training in spy.history[1:])  # train mode after round 0
    assert all(policy == 0.0 and reference == 0.0 for policy, reference, _ in spy.history), spy.history
    assert len(first_ratios) == 3
    deviations = [(r - 1).abs().max().item() for r in first_ratios]
    if disable:  # 1 to float rounding: pi_old is the sampler's log-prob (another computation order; 4e-6 here)
        assert all(d < 1e-4 for d in deviations), deviations
    else:  # dropout kept: the update's forward pass is a random subnetwork, pi_old is not (9e-3 and 0.11 here)
        assert any(d > 1e-3 for d in deviations[1:]), deviations


# ----------------------------------------------------------------------------- the learning-rate schedule


def test_linear_decay_reaches_zero_at_the_last_optimizer_step_of_the_last_round(bed, tmp_path):
    """Iterative DPO trains on every round so far and drops ties, so rounds take different numbers of steps
    (here 2, 4, 6 x epochs) that no estimate made before the run knows. The schedule runs over rounds: the
    learning rate decays linearly through each round's own steps, is (1 - (r + 1) / R) lr at the end of round
    r and reaches 0 exactly at the last optimizer step of the last round."""
    bandit, folder = bed
    trainer = make_iterative(folder, tmp_path, bandit, BradleyTerryPreference(TestbedReward(bandit)), num_rounds=3,
                             prompts_per_round=16, prompts_per_chunk=16, per_device_train_batch_size=8,
                             epochs_per_round=2, learning_rate=5e-4, lr_scheduler_type="linear")
    after, rounds, step = [], [], trainer.optimizer_step

    def recording(loss):
        step(loss)
        after.append(trainer.lr_scheduler.get_last_lr()[0])  # the rate the next step would take
        rounds.append(trainer.clock.round_index)

    trainer.optimizer_step = recording
    trainer.train()
    assert after[-1] == 0.0 and all(lr > 0 for lr in after[:-1]), after
    assert all(a >= b for a, b in zip(after, after[1:]))
    ends = [after[i] for i in range(len(after)) if i == len(after) - 1 or rounds[i + 1] != rounds[i]]
    assert ends == pytest.approx([5e-4 * (1 - (r + 1) / 3) for r in range(3)], abs=1e-12), ends
    counts = [rounds.count(r) for r in range(3)]
    assert len(set(counts)) > 1, counts  # rounds of different lengths: an up-front estimate could not be exact


# ----------------------------------------------------------------------------- divergence


def test_a_non_finite_loss_stops_the_run_naming_round_and_step_and_writes_no_checkpoint(bed, tmp_path):
    """A learning rate of 1e30 overflows the weights at the first step: the second step's loss is NaN. The run
    stops there with a `DivergenceError` naming the round and the optimizer step (a recipe prints it as one
    line and exits with status 2); no checkpoint of the diverged round exists."""
    bandit, folder = bed
    trainer = make_iterative(folder, tmp_path, bandit, BradleyTerryPreference(TestbedReward(bandit)), num_rounds=2,
                             prompts_per_round=16, prompts_per_chunk=16, per_device_train_batch_size=8,
                             learning_rate=1e30)
    with pytest.raises(DivergenceError, match=r"round 0, optimizer step \d+: loss nan"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-round-*")) and not list(tmp_path.glob(".tmp-*"))


def test_a_kl_above_the_threshold_warns_once_per_round(bed, tmp_path, caplog):
    bandit, folder = bed
    trainer = make_iterative(folder, tmp_path, bandit, BradleyTerryPreference(TestbedReward(bandit)), num_rounds=3,
                             prompts_per_round=16, prompts_per_chunk=16, per_device_train_batch_size=8,
                             learning_rate=0.05, kl_warning_threshold=1e-9)
    with caplog.at_level(logging.WARNING, logger="klalign.trainers.guards"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "kl_warning_threshold" in r.getMessage()]
    kls = [h["kl_k3"] for h in trainer.state.log_history if "kl_k3" in h]
    assert len(warnings) == sum(kl > 1e-9 for kl in kls) >= 2, (warnings, kls)
    assert all(math.isfinite(kl) for kl in kls)


# ----------------------------------------------------------------------------- the sampler's own log-probs


PROMPTS = ["How was the weather?", "How was my day?", "Describe the city.", "I think the movie was"]


def tiny_trainer(kind: str, folder, out, dtype=torch.float32, **overrides):
    """An online trainer of `kind` on the tiny Llama (12-token replies: real multi-token samples), fp32, CPU."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from klalign import (
        IterativeDPOConfig,
        IterativeDPOTrainer,
        NashMPConfig,
        NashMPTrainer,
    )
    from klalign.oracles.base import CallableReward
    from klalign.oracles.reward_functions import response_length

    common = dict(output_dir=str(out), num_rounds=1, prompts_per_round=4, prompts_per_chunk=4, max_new_tokens=12,
                  samples_per_prompt=2, learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True,
                  report_to="none", seed=0, save_total_limit=1)
    reward = CallableReward(response_length)
    if kind == "iterative":
        config, trainer_cls, oracle = IterativeDPOConfig, IterativeDPOTrainer, reward
        common.update(enhancer="best_vs_worst", per_device_train_batch_size=4, epochs_per_round=1)
    else:
        config, trainer_cls, oracle = NashMPConfig, NashMPTrainer, BradleyTerryPreference(reward, 4.0)
        common.update(method=kind, inner_steps=2, win_rate_prompts=4, win_rate_samples=1, beta=0.1, eta=2.0)
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=dtype),
        ref_model=AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), args=config(**{**common, **overrides}), train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=AutoTokenizer.from_pretrained(folder), oracle=oracle,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def counting_frozen_passes(trainer) -> list[int]:
    """The rows of every frozen policy pass the trainer takes, in order."""
    rows, frozen = [], trainer.frozen_policy_token_logprobs

    def counted(batch, *args):
        rows.append(batch["input_ids"].size(0))
        return frozen(batch, *args)

    trainer.frozen_policy_token_logprobs = counted
    return rows


def test_the_samplers_log_probs_are_the_policys_and_replace_its_frozen_pass(tiny_policy_dir, tmp_path):
    """HF at temperature 1 and top_p 1, in eval mode, samples from the log-softmax of the policy's raw logits:
    its log-probs of the sampled tokens are the policy's, equal to the frozen pass to 1e-6 a token on the tiny
    Llama: another computation order (KV cache and shared prompt prefill against one pass over the padded
    batch). Measured: 4.8e-7 here (1 float32 ulp at these log-probs, |log p| in [4, 8)), at most 9.5e-7 over
    7,502 tokens (seeds 0-4, generation batches 8 and 32, 1 thread); in bf16 3.9e-3, which is why a bf16 policy
    recomputes. Iterative DPO's collection then takes no frozen pass (issue 22, item 2; before: one over the main samples), and its logged statistics are those of the
    recomputed log-probs: no importance weights and no mismatch (the sampler is pi_t itself)."""
    trainer = tiny_trainer("iterative", tiny_policy_dir, tmp_path)
    samples = [c for per in trainer.generate(PROMPTS, 4) for c in per]
    assert all(c.sampler_logprobs is not None and c.sampler_is_model for c in samples)
    batch = trainer.batch([c.prompt_ids for c in samples], [c.completion_ids for c in samples])
    assert batch["completion_mask"].sum() > 3 * len(samples)  # multi-token replies
    recomputed = trainer.frozen_policy_token_logprobs(batch)  # (16, T-1)
    mask = batch["completion_mask"][:, 1:].bool()
    kept = torch.tensor([x for c in samples for x in c.sampler_logprobs])
    assert (kept - recomputed[mask]).abs().max().item() < 1e-6
    passes = counting_frozen_passes(trainer)
    used = trainer.policy_token_logprobs(batch, samples)
    assert passes == [] and used.dtype == recomputed.dtype and (used - recomputed).abs().max().item() < 1e-6
    assert torch.equal(used[~mask], torch.zeros_like(used[~mask]))
    rows = trainer.collect(0, PROMPTS)
    assert passes == []  # the main samples' statistics came from the sampler
    assert all(r["main_sampler_logprob"] is None and r["main_mismatch_sum"] is None for r in rows)
    for row in rows:  # main_logratio = s_t(y) - s_ref(y) with s_t recomputed
        main = row["chosen_ids"] if row["chosen_policy"] == "pi_t" else row["rejected_ids"]
        one = trainer.batch([row["prompt_ids"]], [main])
        expected = (trainer.frozen_policy_token_logprobs(one) - trainer.reference.token_logprobs(
            trainer.model_wrapped, one)).sum().item()
        assert row["main_logratio"] == pytest.approx(expected, abs=1e-5)


def test_the_frozen_pass_still_runs_where_the_sampler_is_not_the_policy_now(tiny_policy_dir, tmp_path):
    """The sampler's log-probs stand in for the policy's only where they are: not at another temperature (its
    law is the tempered one), not once the weights changed after sampling (a round samples, then updates), not
    for weights other than the ones asked for (an iterate swapped in under its own name), not in bf16 (3.9e-3 a
    token from a recompute)."""
    from klalign.models.snapshots import swapped, take_snapshot

    warm = tiny_trainer("iterative", tiny_policy_dir, tmp_path / "warm", temperature=0.7)
    passes = counting_frozen_passes(warm)
    rows = warm.collect(0, PROMPTS)
    assert passes == [len(PROMPTS)]  # the main samples, recomputed; their mismatch is logged
    assert all(r["main_sampler_logprob"] is not None for r in rows)

    half = tiny_trainer("iterative", tiny_policy_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    passes = counting_frozen_passes(half)
    half.collect(0, PROMPTS)
    assert passes == [len(PROMPTS)]

    trainer = tiny_trainer("iterative", tiny_policy_dir, tmp_path / "hot")
    passes = counting_frozen_passes(trainer)
    samples = [c for per in trainer.generate(PROMPTS, 2) for c in per]
    batch = trainer.batch([c.prompt_ids for c in samples], [c.completion_ids for c in samples])
    trainer.policy_token_logprobs(batch, samples)
    assert passes == []
    before = take_snapshot(trainer.model)
    with torch.no_grad():  # other weights swapped in, sampled under their own name
        altered = {name: value + 0.05 for name, value in before.items()}
    with swapped(trainer.model, altered):
        other = [c for per in trainer.generate(PROMPTS, 2, weights=("other", 0)) for c in per]
        other_batch = trainer.batch([c.prompt_ids for c in other], [c.completion_ids for c in other])
        trainer.policy_token_logprobs(other_batch, other, weights=("other", 0))
        assert passes == []  # asked for the weights that drew them
    trainer.policy_token_logprobs(other_batch, other)  # asked for the current ones
    assert passes == [len(other)]
    steps = trainer.state.global_step
    trainer.train()  # a round: it samples (no frozen pass) and updates, so the weights change after sampling
    assert trainer.state.global_step > steps and passes == [len(other)]
    trainer.policy_token_logprobs(batch, samples)
    assert passes == [len(other), len(samples)]


@pytest.mark.parametrize("method", ["nash_mp", "sppo"])
def test_nash_iterates_keep_their_own_samplers_log_probs_and_recompute_the_anchors(tiny_policy_dir, tmp_path,
                                                                                     method):
    """One NLHF iteration, 2 inner steps per prox step: the win-rate KL of pi_{k+1} on its own samples and
    SPPO's s_k on pi_k's samples come from the sampler (before: a frozen pass each); Nash-MP's anchor pi_k,
    read at inner step 1 on samples drawn by theta_t != theta_k, is still a frozen pass, once per prox step."""
    trainer = tiny_trainer(method, tiny_policy_dir, tmp_path)
    passes, anchor_passes, anchor = counting_frozen_passes(trainer), [], trainer._anchor_logprobs

    def counted_anchor(batch, snapshot, **kwargs):
        out = anchor(batch, snapshot, **kwargs)
        anchor_passes.append(snapshot is not None)
        return out

    trainer._anchor_logprobs = counted_anchor
    trainer.train()
    assert len(passes) == sum(anchor_passes)
    assert sum(anchor_passes) == (2 if method == "nash_mp" else 0)  # half and full step, inner step 1 each
    assert math.isfinite(trainer.state.log_history[-1]["kl_k1"])


@pytest.mark.parametrize("samples", [2, 4])
def test_main_samples_take_their_reference_log_probs_from_the_pairs_pass(tiny_policy_dir, tmp_path, samples):
    """Best vs worst of 2: each main sample is one of its pair, so the reference runs over the pair rows once
    (issue 22: before, a second pass over the main samples' rows) and the logged KL statistics equal those of a
    pass of their own to 1e-5 (another layout's float rounding). Of 4 samples a main sample is often outside its
    pair, and then the main samples get their own pass, as before."""
    trainer = tiny_trainer("iterative", tiny_policy_dir, tmp_path, samples_per_prompt=samples)
    with torch.no_grad():  # a policy away from its reference: log-ratios are not 0
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    from klalign.models.reference import Reference

    passes, counted = [], Reference.token_logprobs

    def counting(self, policy, batch, *args):
        passes.append(batch["input_ids"].size(0))
        return counted(self, policy, batch, *args)

    Reference.token_logprobs = counting
    try:
        torch.manual_seed(1)
        rows = trainer.collect(0, PROMPTS)
    finally:
        Reference.token_logprobs = counted
    pair_rows = 2 * len(PROMPTS)  # one minibatch of 4 pairs: chosen rows, then rejected rows
    assert passes == ([pair_rows] if samples == 2 else [pair_rows, len(PROMPTS)])  # of 4: this seed has one outside
    own = tiny_trainer("iterative", tiny_policy_dir, tmp_path / "own", samples_per_prompt=samples)
    own.model.load_state_dict(trainer.model.state_dict())
    own._main_reference_from_pairs = lambda *args: None  # the main samples' own reference pass
    torch.manual_seed(1)
    expected = own.collect(0, PROMPTS)
    assert [r["chosen_ids"] for r in rows] == [r["chosen_ids"] for r in expected]  # the same samples
    assert max(abs(r["main_logratio"]) for r in rows) > 0.05
    for key in ("main_logratio", "main_kl_k1", "main_kl_k3"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in expected], abs=1e-5)
