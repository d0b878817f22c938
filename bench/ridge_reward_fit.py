"""How well does the optimistic trainer's learned reward rank the oracle's on fresh samples? (issue 19)

    python bench/ridge_reward_fit.py runs/captured_gain_grid/runs/optimistic_kl_greedy_gamma_0-b1024-s0/out

The optimistic KL trainer (`klalign.trainers.optimistic`) takes its RLOO steps on r_hat, a ridge regression of the
oracle's rewards on frozen all-MiniLM-L6-v2 features of (prompt, reply). From a finished run's feedback store
(every round's prompts, replies and oracle rewards; nothing sampled, no oracle call) this refits r_hat as the
trainer does after rounds 0..t-1 (ridge 1) and reports its correlation with the oracle on round t's replies,
overall and within each prompt (what RLOO's advantages use), beside the in-sample fit. A diagnostic, never a test.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from klalign.trainers.features import SentenceEmbeddingFeatures  # noqa: E402
from klalign.trainers.reward_learning import LinearReward  # noqa: E402


def within(x: torch.Tensor, k: int) -> np.ndarray:
    """Centred within each prompt's k replies. (G * k,) -> (G * k,)"""
    x = x.view(-1, k)
    return (x - x.mean(1, keepdim=True)).flatten().numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="The optimistic run's output_dir (its feedback/ folder).")
    parser.add_argument("--ridge", type=float, default=1.0)
    args = parser.parse_args()
    phi_map, rounds = SentenceEmbeddingFeatures(), []
    for folder in sorted(Path(args.run, "feedback").glob("round-*")):
        d = pd.concat([pd.read_parquet(f) for f in sorted(folder.glob("*.parquet"))])
        prompts = [p for p, rs in zip(d["prompt"], d["responses"]) for _ in rs]
        replies = [r for rs in d["responses"] for r in rs]
        rewards = torch.tensor(np.concatenate([np.asarray(r, float) for r in d["rewards"]]))
        rounds.append((phi_map(prompts, replies), rewards, len(d["responses"].iloc[0])))  # (N, d), (N,), k
    print("| fitted on rounds | samples | predicts round | corr | within-prompt corr | in-sample within-prompt corr |")
    print("|---|---:|---:|---:|---:|---:|")
    for t in range(1, len(rounds)):
        phi, y = torch.cat([r[0] for r in rounds[:t]]), torch.cat([r[1] for r in rounds[:t]])
        learner = LinearReward(phi.shape[1], ridge=args.ridge, gamma=0.0).fit(phi, y)
        fresh, truth, k = rounds[t]
        pred = learner.predict(fresh)
        corr = np.corrcoef(pred.numpy(), truth.numpy())[0, 1]
        corr_within = np.corrcoef(within(pred, k), within(truth, k))[0, 1]
        corr_in = np.corrcoef(within(learner.predict(phi), k), within(y, k))[0, 1]
        print(f"| 0-{t - 1} | {len(y)} | {t} | {corr:.2f} | {corr_within:.2f} | {corr_in:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
