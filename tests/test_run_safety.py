"""Runs that never lose, mix or silently corrupt data: the run manifest, verified checkpoints and feedback,
per-round logging and progress (GSHF on the single-token test bed, one process)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_iterative_dpo import make_trainer

from klalign.errors import DataError, ResumeError, RunMismatchError
from klalign.evaluation.checkpoints import find_checkpoints
from klalign.oracles.base import BradleyTerryPreference
from klalign.runs.feedback import FeedbackStore
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward

SMALL = dict(num_rounds=3, prompts_per_round=16, prompts_per_chunk=8, learning_rate=1e-3, save_total_limit=3)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bandit = SingleTokenBandit.random(num_prompts=4, num_actions=6, seed=0)
    folder = tmp_path_factory.mktemp("bed")
    bandit.save(folder)
    return bandit, folder


def oracle(bandit):
    return BradleyTerryPreference(TestbedReward(bandit))  # labels from the loop's seeded generator: reproducible


@pytest.fixture(scope="module")
def straight(bed, tmp_path_factory):
    """An uninterrupted 3-round run: its final weights and its store are what every resume must give."""
    bandit, folder = bed
    out = tmp_path_factory.mktemp("straight")
    make_trainer(folder, out, bandit, oracle(bandit), **SMALL).train()
    return out


def final_weights(out: Path) -> dict:
    return load_file(str(out / "checkpoint-round-00002" / "model.safetensors"))


def copy_run(straight: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    return out


# ----------------------------------------------------------------------------- the run manifest


def test_a_fresh_run_refuses_a_store_that_another_run_wrote(bed, straight, tmp_path):
    """Re-running into an existing output_dir without resuming, with another seed and temperature, used to
    train on the earlier run's stored samples."""
    bandit, folder = bed
    out = copy_run(straight, tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in (out / "feedback").rglob("*.parquet"))
    trainer = make_trainer(folder, out, bandit, oracle(bandit), **{**SMALL, "seed": 1, "temperature": 0.9})
    with pytest.raises(RunMismatchError, match=r"another run.*seed: 0 -> 1.*temperature: 1.0 -> 0.9"):
        trainer.train()
    assert sorted((p.name, p.read_bytes()) for p in (out / "feedback").rglob("*.parquet")) == before


def test_resuming_refuses_settings_that_change_what_is_collected_and_allows_the_rest(bed, straight, tmp_path):
    bandit, folder = bed
    out = copy_run(straight, tmp_path)
    changed = make_trainer(folder, out, bandit, oracle(bandit), **{**SMALL, "learning_rate": 3e-3})
    with pytest.raises(RunMismatchError, match=r"learning_rate: 0.001 -> 0.003"):
        changed.train(resume_from_checkpoint=True)
    # Longer (a constant schedule), logged and saved differently: the same data would be collected.
    longer = make_trainer(folder, out, bandit, oracle(bandit),
                          **{**SMALL, "num_rounds": 4, "logging_steps": 7, "save_every_rounds": 2})
    longer.train(resume_from_checkpoint=True)
    assert FeedbackStore(out / "feedback").rounds() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- verified checkpoints and store


def corrupt(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "zeroed":  # same size, bytes zeroed in place
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize("kind", ["zeroed", "truncated"])
def test_a_damaged_checkpoint_is_named_and_the_intact_one_before_it_used(kind, bed, straight, tmp_path, capsys):
    bandit, folder = bed
    out = copy_run(straight, tmp_path)
    corrupt(out / "checkpoint-round-00002" / "model.safetensors", kind)
    make_trainer(folder, out, bandit, oracle(bandit), **SMALL).train(resume_from_checkpoint=True)
    said = capsys.readouterr().out
    assert "checkpoint-round-00002" in said and "model.safetensors" in said and "damaged" in said
    assert "resuming from checkpoint-round-00001" in said
    weights, expected = final_weights(out), final_weights(straight)  # round 2 replayed from the store
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.parametrize("kind", ["zeroed", "truncated"])
def test_a_corrupt_feedback_chunk_is_found_before_sampling_and_collected_again(kind, bed, straight, tmp_path, capsys):
    bandit, folder = bed
    out = copy_run(straight, tmp_path)
    chunk = out / "feedback" / "round-00001" / "part-00001.parquet"
    original = chunk.read_bytes()
    corrupt(chunk, kind)
    make_trainer(folder, out, bandit, oracle(bandit), **SMALL).train(resume_from_checkpoint=True)
    said = capsys.readouterr().out
    assert "part-00001.parquet: corrupt" in said and "resuming from checkpoint-round-00000" in said
    assert chunk.read_bytes() == original  # collected again with the same seeds: the same rows
    weights, expected = final_weights(out), final_weights(straight)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_corrupt_chunk_is_not_asked_again_of_an_oracle_that_would_answer_differently(bed, tmp_path):
    bandit, folder = bed
    noisy = TestbedReward(bandit, noise_std=0.1, seed=3)  # a private, call-ordered noise stream
    assert not noisy.reproducible
    out = tmp_path / "run"
    make_trainer(folder, out, bandit, noisy, **{**SMALL, "num_rounds": 2}).train()
    corrupt(out / "feedback" / "round-00000" / "part-00000.parquet", "truncated")
    trainer = make_trainer(folder, out, bandit, TestbedReward(bandit, noise_std=0.1, seed=3),
                           **{**SMALL, "num_rounds": 2})
    with pytest.raises(ResumeError, match=r"round-00000/part-00000.parquet.*may answer the same query differently"):
        trainer.train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------- what a user sees


def test_rounds_are_the_x_axis_in_tensorboard_and_evaluate_finds_round_checkpoints(bed, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bandit, folder = bed
    out = tmp_path / "run"
    trainer = make_trainer(folder, out, bandit, oracle(bandit), **SMALL, report_to=["tensorboard"])
    trainer.train()
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents*")).parent))  # <output_dir>/runs/...
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2]  # rounds, not optimizer steps
    assert trainer.state.global_step > 3
    names = [c.name for c in find_checkpoints([str(out)], include_final_model=False)]
    assert names == ["checkpoint-round-00000", "checkpoint-round-00001", "checkpoint-round-00002"]


def test_saving_prints_nothing_and_each_round_one_line(bed, tmp_path, capsys):
    bandit, folder = bed
    make_trainer(folder, tmp_path / "run", bandit, oracle(bandit), **SMALL).train()
    captured = capsys.readouterr()  # stdout: the log; stderr: the progress bar ("round 2: updating")
    assert [line.split(":")[0] for line in captured.out.splitlines() if line.strip()] == ["round 0", "round 1", "round 2"]
    lines = (captured.out + captured.err).splitlines()
    assert not [line for line in lines if "Warning" in line or "Writing model shards" in line], lines


def test_stored_prompts_have_one_schema_and_older_stores_are_read_or_refused():
    """Every trainer stores a prompt as its key (canonical JSON) and reads it back. A store from the older
    optimistic trainer (`json.dumps(prompt)`, unsorted keys) reads back the same prompt; one from the older
    iterative/Nash trainers (string prompts as plain text) is refused with a message naming the store."""
    from klalign.data.prompts import prompt_key, restored_prompt, stored_prompt

    chat = [{"role": "user", "content": "Tell me about the city."}]
    for prompt in ("How was the trip?", chat):
        assert stored_prompt(prompt) == prompt_key(prompt) and restored_prompt(stored_prompt(prompt)) == prompt
        assert restored_prompt(json.dumps(prompt)) == prompt  # the older optimistic trainer's rows
    with pytest.raises(DataError, match="feedback store runs/x.*older klalign"):
        restored_prompt("How was the trip?", "feedback store runs/x")
