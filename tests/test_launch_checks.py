"""Checks that guard the sharded path, tested in one process: equal work per process, gradient
accumulation, on-policy settings, the one reference abstraction, snapshots, whole-model loading."""

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from klalign import (
    GenerationArguments,
    IterativeDPOConfig,
    NashMPConfig,
    OptimisticKLConfig,
    Reference,
    check_equal_work,
    sample_completions,
    swapped,
    take_snapshot,
    whole_model_loading,
)
from klalign.models.snapshots import reset
from klalign.ops.batching import completion_batch
from klalign.ops.logprobs import sequence_logprobs
from klalign.testbed.bandit import SingleTokenBandit


def test_equal_work_names_the_fields_and_the_number_of_processes():
    check_equal_work(4, prompts_per_round=32, prompts_per_chunk=8)
    with pytest.raises(ValueError, match=r"prompts_per_round \(30\).*multiple of the number of processes \(4\)"):
        check_equal_work(4, prompts_per_round=30, prompts_per_chunk=8)
    with pytest.raises(ValueError, match=r"win_rate_prompts \(6\)"):
        check_equal_work(4, prompts_per_round=32, win_rate_prompts=6)


@pytest.mark.parametrize("config", [IterativeDPOConfig, OptimisticKLConfig, NashMPConfig])
def test_online_trainers_refuse_gradient_accumulation(config, tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2"):
        config(output_dir=str(tmp_path), gradient_accumulation_steps=2, use_cpu=True, report_to=[])


@pytest.mark.parametrize("config", [OptimisticKLConfig, NashMPConfig])
@pytest.mark.parametrize("setting", [{"temperature": 0.7}, {"top_p": 0.9}])
def test_policy_gradient_trainers_refuse_off_policy_sampling(config, setting, tmp_path):
    """Without an importance correction; with the default (token-level) one the samples are reweighted."""
    with pytest.raises(ValueError, match="need samples from pi"):
        config(output_dir=str(tmp_path), use_cpu=True, report_to=[], importance_correction="none", **setting)
    assert config(output_dir=str(tmp_path), use_cpu=True, report_to=[], **setting).importance_correction == "token"


@pytest.fixture(scope="module")
def bed():
    bandit = SingleTokenBandit.random(num_prompts=2, num_actions=4, seed=1)
    return bandit, bandit.build_model()


def batch_of(bandit):
    tok = bandit.tokenizer
    prompts = [tok(p).input_ids for p in bandit.prompts]
    return completion_batch(prompts, [[bandit.action_token_ids[0], tok.eos_token_id]] * len(prompts), tok.pad_token_id)


def test_reference_is_the_frozen_model_or_the_disabled_adapter(bed):
    from accelerate import Accelerator

    bandit, model = bed
    accelerator = Accelerator(cpu=True)
    batch = batch_of(bandit)
    expected = sequence_logprobs(model, **batch)
    torch.manual_seed(0)  # the random adapter's own draw, not whatever the tests before left in the generator
    policy = get_peft_model(bandit.build_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    changed = (sequence_logprobs(policy, **batch) - expected).abs().max()
    assert changed > 1e-4, changed  # the adapter changes the policy (measured 4e-3 to 6e-3 over init seeds 0-4;
    # a q_proj adapter alone, before: 1e-4 and less, below allclose's tolerance on some generator states)
    adapter_off = Reference(None, accelerator).sequence_logprobs(policy, batch)
    torch.testing.assert_close(adapter_off, expected)
    frozen = Reference(model, accelerator).sequence_logprobs(policy, batch)
    torch.testing.assert_close(frozen, expected)
    with Reference(None, accelerator).generation_model(policy) as reference:
        samples = sample_completions(reference, bandit.tokenizer, bandit.prompts, 2, GenerationArguments(max_new_tokens=2))
    assert len(samples) == 2 and all(len(s) == 2 for s in samples)


def test_swapped_restores_bit_for_bit_and_reset_restores(bed):
    bandit, _ = bed
    model = bandit.build_model()
    before = take_snapshot(model)
    other = {k: v + 0.5 for k, v in before.items()}
    with swapped(model, other):
        assert all(torch.equal(p, other[k]) for k, p in model.named_parameters())
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    reset(model, other)
    assert all(torch.equal(p, other[k]) for k, p in model.named_parameters())


def test_whole_model_loading_unregisters_zero3_and_puts_it_back():
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
    )

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert is_deepspeed_zero3_enabled()
    with whole_model_loading():
        assert not is_deepspeed_zero3_enabled()
    assert is_deepspeed_zero3_enabled()
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    del config


def test_vllm_launch_environment_is_set_only_while_the_engine_is_built(monkeypatch):
    """vLLM's external launcher needs RANK and MASTER_PORT in a plain process; left in the environment they
    sent every child process to the port this process's store holds (EADDRINUSE in CI). The port comes from
    below the kernel's ephemeral range."""
    from klalign.generation.vllm_engine import _launch_environment

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so monkeypatch restores the variables' absence
        monkeypatch.delenv(name)
    for _ in range(3):
        with _launch_environment():
            assert os.environ["RANK"] == "0" and 1024 <= int(os.environ["MASTER_PORT"]) < low
        assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
    monkeypatch.setenv("RANK", "1")  # under a real launch nothing is touched
    monkeypatch.setenv("MASTER_PORT", "29500")
    with _launch_environment():
        assert os.environ["RANK"] == "1" and os.environ["MASTER_PORT"] == "29500"
    assert os.environ["MASTER_PORT"] == "29500"
