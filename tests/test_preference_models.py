"""Pairwise preference models and the cyclic text judge: symmetry, loading, intransitivity, Nash learning on them."""

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from klalign import NashMPConfig, NashMPTrainer
from klalign.oracles.build import OracleArguments, build_oracle
from klalign.oracles.preference_models import (
    PAIR_TEMPLATE,
    CyclicTextPreference,
    PairwisePreferenceModel,
    text_features,
)
from klalign.testbed.bandit import SingleTokenBandit
from klalign.testbed.metrics import TestbedMetricsCallback

TEXTS = ["It was great, thanks!", "Awful.", "Fine, I think, fine, fine, fine, I think so, really fine."]


def test_pairwise_model_is_symmetrised_and_reads_prompt_and_both_responses():
    oracle = build_oracle(OracleArguments(preference_model_path="tiny:preference", feedback="preference"))
    assert isinstance(oracle, PairwisePreferenceModel) and oracle.reproducible
    a, b = TEXTS[:2] * 2, [TEXTS[1], TEXTS[2], TEXTS[2], TEXTS[0]]
    prompts = ["How was it?"] * 4
    forward, backward = oracle.preference(prompts, a, b), oracle.preference(prompts, b, a)
    torch.testing.assert_close(forward + backward, torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(oracle.preference(prompts[:3], TEXTS, TEXTS), torch.full((3,), 0.5, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    one_order = oracle.first_wins(prompts, a, b)
    assert (one_order - forward).abs().max() > 1e-4  # a random model has a position bias; symmetrising removes it
    assert (oracle.preference(["Tell me about the trip."] * 4, a, b) - forward).abs().max() > 1e-5  # reads the prompt
    one_by_one = torch.cat([oracle.preference(prompts[i:i + 1], a[i:i + 1], b[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(one_by_one, forward, atol=1e-5, rtol=0)  # padding does not change an answer
    assert oracle.fingerprint() == build_oracle(
        OracleArguments(preference_model_path="tiny:preference", feedback="preference")).fingerprint()
    assert oracle.prepare(device="cpu") is oracle


def test_a_two_output_model_gives_the_first_outputs_probability(tiny_tokenizer):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=2, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    oracle = PairwisePreferenceModel(model, tiny_tokenizer)
    text = PAIR_TEMPLATE.format(prompt="q", a=TEXTS[0], b=TEXTS[1])
    logits = model(**tiny_tokenizer([text], return_tensors="pt")).logits.double()
    assert oracle.first_wins(["q"], TEXTS[:1], TEXTS[1:2]).item() == pytest.approx(
        torch.softmax(logits, -1)[0, 0].item(), abs=1e-6)
    with pytest.raises(ValueError, match="num_labels=3"):
        config.num_labels = 3
        PairwisePreferenceModel(LlamaForSequenceClassification(config), tiny_tokenizer)


def fit_pairwise_model(bandit, steps=300, seed=0, lr=3e-3) -> LlamaForSequenceClassification:
    """A tiny pairwise classifier trained (soft labels, Adam) to output the bed's P(a_i > a_j | prompt c)."""
    tokenizer = bandit.tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    C, K = bandit.num_prompts, bandit.num_actions
    triples = [(c, i, j) for c in range(C) for i in range(K) for j in range(K)]
    texts = [PAIR_TEMPLATE.format(prompt=bandit.prompts[c], a=bandit.actions[i], b=bandit.actions[j])
             for c, i, j in triples]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    target = torch.tensor([bandit.P[c, i, j].item() for c, i, j in triples], dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits[:, 0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def learned_bed(tmp_path_factory):
    """The intransitive bed (2 prompts x 8 actions) and a pairwise model of its P, saved and loaded by path."""
    bandit = SingleTokenBandit.intransitive(num_prompts=2, num_actions=8, seed=0)
    folder = tmp_path_factory.mktemp("bed")
    bandit.save(folder)
    model_dir = tmp_path_factory.mktemp("preference-model")
    fit_pairwise_model(bandit).save_pretrained(model_dir)
    bandit.tokenizer.save_pretrained(model_dir)
    oracle = build_oracle(OracleArguments(preference_model_path=str(model_dir), feedback="preference"))
    return bandit, folder, oracle


def test_a_pairwise_model_learns_an_intransitive_preference(learned_bed):
    """Trained on the bed's P (3-cycles at every prompt), loaded from its folder: close to P on average and with
    the same cycles, which no Bradley-Terry reward has.

    The mean absolute error over the 128 cells, over init seeds 0-7 x {1, 2 threads, ATEN_CPU_CAPABILITY=default}
    (24 runs): 0.0005-0.020 (mean 0.006); bar 0.08, midway in log scale to what a broken oracle gives (untrained
    or unloaded weights 0.34, the second order not flipped 0.34, the sign flipped 0.68). The max error is not the bar:
    300 Adam steps sometimes leave one ordered pair stuck near 1/2, so over the same runs it spreads 0.0025-0.26
    (seed 0: 0.045 here, 0.069 on a Xeon) against 0.50-1.0 broken, too close to hold on every CPU."""
    bandit, _, oracle = learned_bed
    C, K = bandit.num_prompts, bandit.num_actions
    c, i, j = (x.flatten() for x in torch.meshgrid(torch.arange(C), torch.arange(K), torch.arange(K), indexing="ij"))
    learned = oracle.preference([bandit.prompts[x] for x in c], [bandit.actions[x] for x in i],
                                [bandit.actions[x] for x in j]).view(C, K, K)
    assert (learned - bandit.P).abs().mean() < 0.08, (learned - bandit.P).abs().max()
    beats = (learned > 0.5).double()
    assert (torch.einsum("cab,cbd,cda->c", beats, beats, beats) > 0).all()  # a > b > d > a at every prompt


def test_nash_mp_against_a_learned_preference_model_approaches_the_true_equilibrium(learned_bed, tmp_path):
    """Nash-MP queries the pairwise model, never the bed's table: exploitability under the true P goes from 0.070
    (pi_ref) to below 0.025 in 8 iterations. Over seeds 0-7 (model and trainer) x {1, 2 threads,
    ATEN_CPU_CAPABILITY=default}: 0.0035-0.0085, also with models whose max error is 0.26 (the model's own error
    bounds how close it can get); bar 0.025, midway in log scale to pi_ref's 0.070. Broken: the policy gradient's
    sign flipped 0.088, its KL to pi_ref dropped 0.084, the oracle's weights not loaded 0.070."""
    bandit, folder, oracle = learned_bed
    metrics = TestbedMetricsCallback(bandit, beta=0.1)
    args = NashMPConfig(
        output_dir=str(tmp_path), beta=0.1, eta=4.0, inner_steps=8, samples_per_prompt=32, num_rounds=8,
        prompts_per_round=2, prompts_per_chunk=2, max_new_tokens=1, generation_batch_size=4096, win_rate_prompts=0,
        optim="sgd", learning_rate=0.1, anneal_prox_steps=True, max_grad_norm=0.0, use_cpu=True, bf16=False,
        report_to="none", save_total_limit=1, seed=0, disable_tqdm=True,
    )
    trainer = NashMPTrainer(AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder),
                            args, bandit.prompt_dataset(), AutoTokenizer.from_pretrained(folder), oracle,
                            callbacks=[metrics])
    trainer.train()
    curve = [h["testbed/exploitability"] for h in metrics.history]
    assert curve[-1] < 0.025, curve
    assert trainer.settings["oracle"] == oracle.fingerprint()


def test_cyclic_text_judge_is_intransitive_on_real_text():
    """positive beats long, long beats varied, varied beats positive: a cycle of three real sentences."""
    oracle = build_oracle(OracleArguments(preference_fn="cyclic_text", feedback="preference"))
    assert isinstance(oracle, CyclicTextPreference) and oracle.reproducible
    positive = "Great!"
    long = " ".join(["the movie was on and then it was over and we went home"] * 3)
    varied = "A quiet harbour town, fog rolling over grey slate roofs, gulls circling fishing boats."
    features = text_features([positive, long, varied])  # (3, 3): sentiment, length, variety
    assert features[0, 0] > 0.5 and features[1, 1] > 0.5 and features[2, 2] > 0.9
    cycle = oracle.preference(["q"] * 3, [positive, long, varied], [long, varied, positive])
    assert (cycle > 0.5).all(), cycle
    reverse = oracle.preference(["q"] * 3, [long, varied, positive], [positive, long, varied])
    torch.testing.assert_close(cycle + reverse, torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert oracle.preference(["q"], [positive], [positive]).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="temperature"):
        CyclicTextPreference(temperature=0.0)


def test_cyclic_judge_is_not_a_bradley_terry_reward():
    """No reward r makes sigmoid(r(A) - r(B)) match it on the cycle: the log-odds around it sum to > 0."""
    oracle = CyclicTextPreference()
    texts = ["Great!", " ".join(["the movie was on and then it was over and we went home"] * 3),
             "A quiet harbour town, fog rolling over grey slate roofs, gulls circling fishing boats."]
    p = oracle.preference(["q"] * 3, texts, texts[1:] + texts[:1]).numpy()
    assert np.log(p / (1 - p)).sum() > 1.0  # a Bradley-Terry model's would be exactly 0
