"""Oracle queries to reach the tilted optimum: online iterative DPO (GSHF) against offline DPO.

    python bench/iterative_vs_offline.py                       # K=16 actions, 3 seeds (~10 min on 2 cores)
    python bench/iterative_vs_offline.py --actions 8 --seeds 1 # quicker

Single-token test bed, Bradley-Terry oracle over a known reward, beta fixed. Offline DPO is
trained (klalign.DPOTrainer, to convergence) on B uniformly drawn distinct pairs for each budget
B, and on B pairs drawn from pi_ref (what an offline dataset of the reference policy holds);
iterative DPO (klalign.IterativeDPOTrainer, temperature enhancer) spends 64 queries a round
and is measured after every round. The table gives KL(pi || pi*) against queries and, per
method, the queries needed to reach the target (median and range over seeds).
"""

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from klalign import DPOConfig, DPOTrainer, IterativeDPOConfig, IterativeDPOTrainer  # noqa: E402
from klalign.oracles.base import BradleyTerryPreference  # noqa: E402
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward  # noqa: E402
from klalign.testbed.metrics import TestbedMetricsCallback, exact_metrics  # noqa: E402
from klalign.testbed.model import read_policy

BUDGETS = [256, 512, 1024, 2048, 4096, 8192]


def offline_kl(bandit, folder, budget, beta, seed, sampler=None) -> float:
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), beta=beta, learning_rate=1e-2, num_train_epochs=max(2, 24000 // budget),
        per_device_train_batch_size=256, lr_scheduler_type="cosine", precompute_ref_log_probs=True, use_cpu=True,
        bf16=False, report_to=[], save_strategy="no", gradient_checkpointing=False, seed=seed,
    )
    policy = AutoModelForCausalLM.from_pretrained(folder)
    DPOTrainer(model=policy, ref_model=AutoModelForCausalLM.from_pretrained(folder), args=args,
               train_dataset=bandit.preference_dataset(budget, seed=seed, sampler=sampler),
               processing_class=AutoTokenizer.from_pretrained(folder)).train()
    return exact_metrics(read_policy(policy, bandit).numpy(), bandit, beta)["testbed/kl_to_optimum"]


# Iterative DPO's settings. lr 1e-3 was chosen over 3e-3 on bed seeds 3 and 4, which the table does not report
# (queries to KL 0.02: 512 and 704 against 1600 and 1856); at 3e-3 the trainer sits at the DPO fit of its own
# pairs (a tabular fit of the stored pairs gives the same KL) but collects worse pairs (docs/bench/iterative_vs_offline.md).
ITERATIVE_SETTINGS = dict(
    prompts_per_round=64, prompts_per_chunk=64, max_new_tokens=1, enhancer="temperature", enhancer_temperature=1.5,
    learning_rate=1e-3, per_device_train_batch_size=64, epochs_per_round=3, lr_scheduler_type="constant",
    pair_labels="drawn",  # one label drawn per pair, as offline DPO's pairs carry (IterativeDPOConfig's default
    # 'expected' trains on the oracle's P itself: on this bed GSHF is then under KL 0.02 after 128-192 queries)
)


def iterative_curve(bandit, folder, rounds, beta, seed) -> list[tuple[int, float]]:
    metrics = TestbedMetricsCallback(bandit, beta)
    args = IterativeDPOConfig(
        output_dir=tempfile.mkdtemp(), beta=beta, num_rounds=rounds, **ITERATIVE_SETTINGS, use_cpu=True,
        report_to=[], seed=seed, save_total_limit=1,
    )
    IterativeDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder), ref_model=AutoModelForCausalLM.from_pretrained(folder),
        args=args, train_dataset=bandit.prompt_dataset(), processing_class=AutoTokenizer.from_pretrained(folder),
        oracle=BradleyTerryPreference(TestbedReward(bandit)), callbacks=[metrics],
    ).train()
    return [(64 * (h["round"] + 1), h["testbed/kl_to_optimum"]) for h in metrics.history]


def first_reaching(points, target):
    return next((q for q, v in points if v < target), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--actions", type=int, default=16)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ref-scale", type=float, default=1.0, help="ref = softmax(ref_scale * N(0,1)): larger is more skewed")
    args = parser.parse_args()
    reached = {"offline DPO, uniform pairs": [], "offline DPO, pairs from pi_ref": [], "iterative DPO (GSHF)": []}
    rows = []
    for seed in range(args.seeds):
        bandit = SingleTokenBandit.random(num_prompts=args.prompts, num_actions=args.actions, seed=seed,
                                          ref_scale=args.ref_scale)
        folder = tempfile.mkdtemp()
        bandit.save(folder)
        uniform = [(b, offline_kl(bandit, folder, b, args.beta, seed)) for b in BUDGETS]
        from_ref = [(b, offline_kl(bandit, folder, b, args.beta, seed, sampler=bandit.ref)) for b in BUDGETS]
        online = iterative_curve(bandit, folder, args.rounds, args.beta, seed)
        for name, points in zip(reached, (uniform, from_ref, online)):
            reached[name].append(first_reaching(points, args.target))
        rows.append((seed, uniform, from_ref, dict(online)))
    print(f"\nSingle-token test bed: {args.prompts} prompts x {args.actions} actions (ref_scale {args.ref_scale}), "
          f"beta {args.beta}, Bradley-Terry oracle; KL(pi || pi*) by oracle queries")
    print("| seed | queries | offline, uniform pairs | offline, pairs from pi_ref | iterative DPO |\n|---|---|---|---|---|")
    for seed, uniform, from_ref, online in rows:
        for (budget, value), (_, value_ref) in zip(uniform, from_ref):
            near = min(online, key=lambda q: abs(q - budget))
            print(f"| {seed} | {budget} | {value:.4f} | {value_ref:.4f} | {online[near]:.4f} (at {near}) |")
    print(f"\nQueries to reach KL < {args.target} (median over {args.seeds} seeds; runs: each seed)")
    print("| method | median | runs |\n|---|---|---|")
    for name, values in reached.items():
        found = [v for v in values if v is not None]
        median = statistics.median(found) if len(found) == len(values) else "not reached in all seeds"
        print(f"| {name} | {median} | {values} |")
    on = reached["iterative DPO (GSHF)"]
    for name in ("offline DPO, uniform pairs", "offline DPO, pairs from pi_ref"):
        off = reached[name]
        if all(v is not None for v in off + on):
            print(f"ratio iterative / {name} (medians): {statistics.median(on) / statistics.median(off):.2f}")


if __name__ == "__main__":
    main()
