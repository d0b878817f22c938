"""Best-of-N and RSO's data step killed mid-run and resumed write the same file as an uninterrupted run,
and refuse to continue a file written with other settings."""

import json
import textwrap

import pytest
from conftest import run_script

from klalign.errors import RunMismatchError
from klalign.testbed.bandit import SingleTokenBandit

KILLABLE = textwrap.dedent('''
    import os, sys
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from klalign import BestOfNSampler, GenerationArguments, RejectionSamplingArguments, build_rso_dataset
    from klalign.oracles.base import RewardOracle
    from klalign.testbed.bandit import SingleTokenBandit, TestbedReward

    job, folder, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    bandit = SingleTokenBandit.load(folder)
    table = TestbedReward(bandit)

    class Killing(RewardOracle):
        name = "testbed_reward"
        calls = 0
        def _score(self, prompts, responses):
            Killing.calls += 1
            if Killing.calls == kill_at:
                os._exit(137)  # killed while a group is in flight
            return table.score(prompts, responses)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompts = bandit.prompts * 2  # duplicates are sampled once
    generation = GenerationArguments(max_new_tokens=1, generation_batch_size=8)
    if job == "best_of_n":
        BestOfNSampler(model, tokenizer, Killing(), n=4, generation=generation, seed=7, progress=False).sample(prompts, out)
    else:
        args = RejectionSamplingArguments(reward_fn="vader", num_candidates=4, sampling_beta=1.0, sampling_seed=7)
        build_rso_dataset(model, tokenizer, prompts, Killing(), out, args, generation)
''')


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bandit = SingleTokenBandit.random(num_prompts=8, num_actions=6, seed=2)
    folder = tmp_path_factory.mktemp("bed")
    bandit.save(folder)
    return folder


@pytest.mark.parametrize("job", ["best_of_n", "rso"])
def test_killed_and_resumed_writes_the_uninterrupted_file(job, bed, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(KILLABLE)

    def run(name, kill_at):
        return run_script([str(script), job, str(bed), str(tmp_path / name), str(kill_at)])

    assert run("straight.jsonl", 0).returncode == 0
    # Groups of 2 prompts (8 sequences a call): BoN scores a group per call, RSO a prompt per call.
    kill_at = 3 if job == "best_of_n" else 5
    assert run("killed.jsonl", kill_at).returncode == 137
    partial = (tmp_path / "killed.jsonl").read_text().splitlines()
    assert 0 < len(partial) < len((tmp_path / "straight.jsonl").read_text().splitlines())
    assert run("killed.jsonl", 0).returncode == 0  # resumed: the same command again
    assert (tmp_path / "killed.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()
    if job == "rso":  # every prompt recorded once, in order
        index = [json.loads(line)["prompt"] for line in (tmp_path / "killed.prompts.jsonl").read_text().splitlines()]
        assert index == SingleTokenBandit.load(bed).prompts


def test_a_results_file_of_other_settings_is_not_continued(bed, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from klalign import BestOfNSampler, GenerationArguments
    from klalign.testbed.bandit import TestbedReward

    bandit = SingleTokenBandit.load(bed)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(bed), AutoTokenizer.from_pretrained(bed)
    generation = GenerationArguments(max_new_tokens=1)
    out = tmp_path / "bon.jsonl"
    BestOfNSampler(model, tokenizer, TestbedReward(bandit), n=4, generation=generation, progress=False).sample(
        bandit.prompts[:2], out)
    with pytest.raises(RunMismatchError, match=r"n: 4 -> 8"):
        BestOfNSampler(model, tokenizer, TestbedReward(bandit), n=8, generation=generation, progress=False).sample(
            bandit.prompts, out)
