"""Two processes on one CPU machine (gloo): DDP and DeepSpeed ZeRO-2/3 give the 1-process numbers.

Run with `make test-distributed` (CI runs it too). Each case launches the shipped recipe with
`accelerate launch` and the shipped accelerate config, with tiny overrides, and compares the
logged losses with a 1-process run of the same global batch. Tolerance: 1e-4 absolute (the
same float32 sums in another order).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.distributed

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
MULTI = {  # accelerate config -> (extra environment, extra recipe arguments)
    "ddp": ("configs/accelerate/cpu_ddp.yaml", {"ACCELERATE_USE_CPU": "true"}, []),
    "zero2": ("configs/accelerate/cpu_zero2.yaml", {}, ["--use_cpu", "false", "--ddp_backend", "gloo"]),
    "zero3": ("configs/accelerate/cpu_zero3.yaml", {}, ["--use_cpu", "false", "--ddp_backend", "gloo"]),
}


def launch(mode: str, recipe: str, config: str, *args: str) -> subprocess.CompletedProcess:
    accelerate_config, env, extra = MULTI[mode] if mode in MULTI else ("configs/accelerate/cpu.yaml", {}, [])
    proc = subprocess.run(
        [*LAUNCH, "--config_file", accelerate_config, recipe, "--config", config, *args, *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def logged(folder, key="loss"):
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


@pytest.fixture(scope="module")
def dpo_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-1")
    launch("single", "recipes/dpo.py", "configs/tiny/dpo.yaml", "--output_dir", str(out), "--max_steps", "4",
           "--logging_steps", "1", "--per_device_train_batch_size", "16")
    return out


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_dpo_matches_one_process(mode, dpo_single, tmp_path):
    launch(mode, "recipes/dpo.py", "configs/tiny/dpo.yaml", "--output_dir", str(tmp_path), "--max_steps", "4",
           "--logging_steps", "1", "--per_device_train_batch_size", "8")
    single, multi = logged(dpo_single), logged(tmp_path)
    assert len(multi) == 4 and multi == pytest.approx(single, abs=1e-4)
    assert multi[-1] < multi[0]  # it trains


def test_zero3_checkpoint_reloads_as_a_plain_hf_model(dpo_single, tmp_path):
    from transformers import AutoModelForCausalLM

    launch("zero3", "recipes/dpo.py", "configs/tiny/dpo.yaml", "--output_dir", str(tmp_path), "--max_steps", "4",
           "--per_device_train_batch_size", "8")
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path)  # gathered 16-bit save: a full model
    plain = AutoModelForCausalLM.from_pretrained(dpo_single)
    for (name, a), (_, b) in zip(sharded.state_dict().items(), plain.state_dict().items()):
        assert a.shape == b.shape and a.numel() > 0, name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


ONLINE = ["--num_rounds", "2", "--prompts_per_round", "8", "--prompts_per_chunk", "8", "--max_new_tokens", "6",
          "--per_device_train_batch_size", "4"]


@pytest.fixture(scope="module")
def iterative_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("it-1")
    launch("single", "recipes/iterative_dpo.py", "configs/tiny/iterative_dpo.yaml", "--output_dir", str(out),
           *ONLINE, "--per_device_train_batch_size", "8")
    return out


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_iterative_dpo_update_matches_one_process(mode, iterative_single, tmp_path):
    """Given the same feedback (the 1-process run's store), N processes make the same updates."""
    shutil.copytree(iterative_single / "feedback", tmp_path / "feedback")
    launch(mode, "recipes/iterative_dpo.py", "configs/tiny/iterative_dpo.yaml", "--output_dir", str(tmp_path), *ONLINE)
    single = [h for h in logged(iterative_single / "checkpoint-round-00001", "round")]
    state = json.loads((tmp_path / "checkpoint-round-00001" / "trainer_state.json").read_text())["log_history"]
    expected = [h["loss"] for h in json.loads(
        (iterative_single / "checkpoint-round-00001" / "trainer_state.json").read_text())["log_history"]]
    assert len(single) == 2
    assert [h["loss"] for h in state] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_iterative_dpo_generates_with_sharded_parameters(mode, tmp_path):
    launch(mode, "recipes/iterative_dpo.py", "configs/tiny/iterative_dpo.yaml", "--output_dir", str(tmp_path), *ONLINE)
    from klalign.feedback import FeedbackStore

    rows = FeedbackStore(tmp_path / "feedback").dataset().to_list()
    assert len(rows) == 16 and all(len(r["chosen_ids"]) > 0 for r in rows)  # both rounds, both processes
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert "round 1 kl_k3" in summary


def test_optimistic_kl_trains_under_ddp(tmp_path):
    launch("ddp", "recipes/optimistic_kl.py", "configs/tiny/optimistic_kl.yaml", "--output_dir", str(tmp_path),
           "--num_rounds", "2", "--prompts_per_round", "8", "--prompts_per_chunk", "8", "--max_new_tokens", "8")
    from klalign.feedback import FeedbackStore

    assert FeedbackStore(tmp_path / "feedback").rounds() == [0, 1]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "checkpoint-round-00001").is_dir()


def test_rso_trains_under_ddp(tmp_path):
    launch("ddp", "recipes/rso.py", "configs/tiny/rso.yaml", "--output_dir", str(tmp_path), "--num_candidates", "4",
           "--max_new_tokens", "6", "--num_train_epochs", "1", "--sampling_beta", "1.0")
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert summary["candidates"] == 40 * 4 and summary["train_loss"] is not None
    pairs = (tmp_path / "rso_pairs.jsonl").read_text().splitlines()
    assert len(pairs) == len(set(pairs)) == summary["pairs_in_file"]  # written once, by one process
