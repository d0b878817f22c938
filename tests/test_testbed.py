"""The single-token test bed: exact policy, generation, tokenization, oracles, data, PEFT."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, AutoTokenizer

from klalign.oracles.base import BradleyTerryPreference
from klalign.testbed.bandit import SingleTokenBandit, TestbedPreference, TestbedReward
from klalign.testbed.model import (
    eos_after_action,
    off_action_mass,
    read_policy,
    sample_actions,
)

INSTANCES = {
    "random": lambda: SingleTokenBandit.random(4, 8, seed=0),
    "linear": lambda: SingleTokenBandit.random(3, 5, seed=1, feature_dim=4),
    "underexplored": lambda: SingleTokenBandit.underexplored(2, 10, seed=0),
    "intransitive": lambda: SingleTokenBandit.intransitive(2, 8, seed=0),
}


@pytest.fixture(scope="module")
def bandit():
    return SingleTokenBandit.random(4, 8, seed=0)


@pytest.fixture(scope="module")
def folder(bandit, tmp_path_factory):
    return bandit.save(tmp_path_factory.mktemp("testbed"))


def load(folder):
    """Model and tokenizer exactly as a trainer would load them."""
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", INSTANCES)
def test_policy_is_ref_after_save_and_load(name, tmp_path):
    bandit = INSTANCES[name]()
    model, tokenizer = load(bandit.save(tmp_path))
    policy = read_policy(model, bandit)  # (C, K)
    assert policy.dtype == torch.float64 and policy.shape == bandit.ref.shape
    assert (policy - bandit.ref).abs().max() < 1e-5
    assert (policy.log() - bandit.ref.log()).abs().max() < 1e-3  # small masses too (underexplored: e^-8)
    assert off_action_mass(model, bandit).max() < 1e-6
    assert eos_after_action(model, bandit).min() > 1 - 1e-6
    assert not model.config.tie_word_embeddings
    assert tokenizer.padding_side == "left" and tokenizer.chat_template
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    loaded = SingleTokenBandit.load(tmp_path)
    for table in ("ref", "reward", "features", "theta", "P"):
        mine, theirs = getattr(bandit, table), getattr(loaded, table)
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)


def test_generate_samples_the_read_policy(bandit, folder):
    model, _ = load(folder)
    n = 4000
    samples = sample_actions(model, bandit, n, seed=0)  # (C, n)
    assert samples.shape == (bandit.num_prompts, n) and (samples >= 0).all()
    counts = torch.stack([torch.bincount(row, minlength=bandit.num_actions) for row in samples])  # (C, K)
    policy = read_policy(model, bandit)
    wrong = policy.flip(-1)  # same probabilities, wrong actions
    for c in range(bandit.num_prompts):
        assert chisquare(counts[c].numpy(), n * policy[c].numpy()).pvalue > 1e-3
        assert chisquare(counts[c].numpy(), n * wrong[c].numpy()).pvalue < 1e-6
    assert torch.equal(samples, sample_actions(model, bandit, n, seed=0))


def test_tokenization_prompt_plus_action_is_one_more_token(bandit, folder):
    _, tokenizer = load(folder)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    for prompt in bandit.prompts:
        prompt_ids = tokenizer(prompt).input_ids
        assert prompt_ids[0] == tokenizer.bos_token_id and len(prompt_ids) == 3
        for k, action in enumerate(bandit.actions):
            action_id = bandit.action_token_ids[k]
            assert tokenizer.convert_ids_to_tokens(action_id) == action
            for text in (prompt + action, prompt + " " + action):
                assert tokenizer(text).input_ids == prompt_ids + [action_id]
            assert tokenizer(prompt + action + eos).input_ids == prompt_ids + [action_id, eos_id]
            conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": action}]
            rendered = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True)
            assert rendered["input_ids"] == prompt_ids
            rendered = tokenizer.apply_chat_template(conversation)["input_ids"]
            assert rendered == prompt_ids + [action_id, eos_id]
            decoded = tokenizer.decode([action_id])  # what a trainer hands an oracle after generate()
            assert decoded == action and bandit.action_index(decoded) == k


def test_trl_dpo_splits_prompt_and_completion(bandit, folder, tmp_path):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load(folder)
    reference, _ = load(folder)
    args = DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], gradient_checkpointing=False
    )
    plain = bandit.preference_dataset(8, seed=0)
    conversational = plain.map(lambda e: {
        "prompt": [{"role": "user", "content": e["prompt"]}],
        "chosen": [{"role": "assistant", "content": e["chosen"]}],
        "rejected": [{"role": "assistant", "content": e["rejected"]}],
    })
    for data in (plain, conversational):
        trainer = DPOTrainer(
            model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer
        )
        for row, original in zip(trainer.train_dataset, plain):
            assert row["prompt_ids"] == tokenizer(original["prompt"]).input_ids
            for side in ("chosen", "rejected"):
                action_id = bandit.action_token_ids[bandit.action_index(original[side])]
                assert row[f"{side}_ids"] == [action_id, tokenizer.eos_token_id]


def test_reward_oracle_looks_up_the_table(bandit):
    oracle = TestbedReward(bandit)
    prompts = [p for p in bandit.prompts for _ in bandit.actions]
    responses = bandit.actions * bandit.num_prompts
    assert torch.equal(oracle.score(prompts, responses), bandit.reward.flatten())
    # what TRL hands back: decoded completions, with or without whitespace and EOS
    assert oracle.score(["prompt 2 "], [" a3</s>"]).item() == bandit.reward[2, 3].item()

    noisy = [TestbedReward(bandit, noise_std=0.5, seed=s) for s in (7, 7, 8)]
    draws = [o.score(prompts * 100, responses * 100) for o in noisy]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    noise = draws[0] - bandit.reward.flatten().repeat(100)
    assert abs(noise.std().item() - 0.5) < 0.03 and abs(noise.mean().item()) < 0.03


def test_bradley_terry_probabilities(bandit):
    oracle = BradleyTerryPreference(TestbedReward(bandit))
    C, K = bandit.ref.shape
    c, a, b = torch.meshgrid(torch.arange(C), torch.arange(K), torch.arange(K), indexing="ij")
    c, a, b = c.flatten(), a.flatten(), b.flatten()
    args = ([bandit.prompts[i] for i in c], [bandit.actions[i] for i in a], [bandit.actions[i] for i in b])
    expected = torch.sigmoid(bandit.reward[c, a] - bandit.reward[c, b])
    assert torch.allclose(oracle.preference(*args), expected, atol=1e-12)
    assert torch.allclose(TestbedPreference(bandit).preference(*args), expected, atol=1e-12)


def test_intransitive_preferences():
    bandit = SingleTokenBandit.intransitive(3, 8, seed=0)
    P = bandit.P  # (C, K, K)
    assert torch.allclose(P + P.transpose(1, 2), torch.ones_like(P))
    assert (P >= 0).all() and (P <= 1).all()
    beats = (P > 0.5).double()  # (C, K, K)
    cycles = torch.einsum("cab,cbd,cda->c", beats, beats, beats)  # 3-cycles a > b > d > a, per prompt
    assert (cycles > 0).all()
    assert not torch.equal(P[0], P[1])  # a different game at each prompt
    oracle = TestbedPreference(bandit)
    assert oracle.preference(["prompt 1", "prompt 2"], ["a2", "a5"], ["a6", "a0"]).tolist() == [
        P[1, 2, 6].item(), P[2, 5, 0].item()
    ]
    with pytest.raises(ValueError, match="no reward"):
        TestbedReward(bandit)


def test_unknown_prompts_raise_and_non_actions_are_the_worst_response(bandit):
    with pytest.raises(ValueError, match="'a99'"):
        bandit.action_index("a99")
    with pytest.raises(ValueError, match="'prompt 17'"):
        TestbedReward(bandit).score(["prompt 17"], ["a1"])
    reward = TestbedReward(bandit).score(["prompt 0"] * 3, ["a99", "", "a1"])
    assert reward[0] == reward[1] == bandit.reward_table()[0].min() - 1 < reward[2]
    probs = TestbedPreference(bandit).preference(["prompt 0"] * 3, ["a1", "hello world", ""], ["", "a1", "x"])
    assert probs.tolist() == [1.0, 0.0, 0.5]


@pytest.mark.parametrize("kind", ["bradley_terry", "intransitive"])
def test_preference_dataset_labels_follow_the_oracle(kind):
    if kind == "bradley_terry":
        bandit, oracle = SingleTokenBandit.random(2, 3, seed=3, reward_scale=1.5), None
    else:
        bandit = SingleTokenBandit.intransitive(2, 3, seed=3, strength=0.6)
        oracle = TestbedPreference(bandit)
    P = bandit.preference_matrix()  # (C, K, K)
    data = bandit.preference_dataset(12000, seed=0, oracle=oracle)
    assert data.column_names == ["prompt", "chosen", "rejected", "preference_prob"]
    assert all(isinstance(data[0][col], str) for col in ("prompt", "chosen", "rejected"))
    for row in data.select(range(50)):  # the stored P(chosen > rejected) is the oracle's, oriented to the chosen
        c, a, b = (bandit.prompts.index(row["prompt"]), bandit.action_index(row["chosen"]),
                   bandit.action_index(row["rejected"]))
        assert row["preference_prob"] == pytest.approx(P[c, a, b].item(), abs=1e-6)
    wins = torch.zeros_like(P)  # wins[c, a, b]: a chosen over b; games counts each game at (a, b) and (b, a)
    for row in data:
        c = bandit.prompt_index(row["prompt"])
        wins[c, bandit.action_index(row["chosen"]), bandit.action_index(row["rejected"])] += 1
    games = wins + wins.transpose(1, 2)
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    assert games.diagonal(dim1=1, dim2=2).sum() == 0  # the two responses always differ
    assert (games.sum((1, 2)) == 2 * 6000).all() and (games[:, off_diagonal] > 1800).all()  # ~2000 per pair
    frequency = wins[:, off_diagonal] / games[:, off_diagonal]
    p = P[:, off_diagonal]
    z = (frequency - p) / (p * (1 - p) / games[:, off_diagonal]).sqrt()
    assert z.abs().max() < 4.5


def test_preference_dataset_uses_the_sampler(bandit):
    sampler = torch.zeros(4, 8, dtype=torch.float64)
    sampler[:, [2, 5]] = 0.5
    data = bandit.preference_dataset(200, seed=1, sampler=sampler)
    assert set(data["chosen"]) | set(data["rejected"]) == {"a2", "a5"}
    assert data["prompt"][:8] == bandit.prompts * 2
    assert data.to_dict() == bandit.preference_dataset(200, seed=1, sampler=sampler).to_dict()
    with pytest.raises(ValueError, match="sampler"):
        bandit.preference_dataset(10, sampler=torch.eye(4, 8))  # one action per row: no pair exists


def test_optimal_policy_is_the_tilt(bandit):
    beta = 0.3
    expected = bandit.ref * torch.exp(bandit.reward / beta)
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(bandit.optimal_policy(beta), expected, atol=1e-12)
    assert bandit.prompt_dataset(repeats=2)["prompt"] == bandit.prompts * 2


def test_peft_model_reads_the_same_policy(bandit, folder):
    from peft import LoraConfig, get_peft_model

    model, _ = load(folder)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert (read_policy(peft_model, bandit) - bandit.ref).abs().max() < 1e-5
    assert (sample_actions(peft_model, bandit, 50, seed=0) >= 0).all()


def test_invalid_inputs_fail_loudly(bandit):
    with pytest.raises(RuntimeError, match="hidden_size=8 may be too small"):
        bandit.build_model(hidden_size=8, closed=False)  # the closed bed only needs the C prompt rows exact
    with pytest.raises(ValueError, match="sum to 1"):
        SingleTokenBandit(torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="P must satisfy"):
        SingleTokenBandit(torch.full((4, 3), 1 / 3, dtype=torch.float64), P=torch.full((4, 3, 3), 0.7))
