"""How many scored replies does it take to learn VADER's direction on SmolLM2's replies? (issue 19)

    python bench/reward_learnability.py --evaluation runs/captured_gain_grid/train/evaluation \
        --prompts runs/captured_gain_grid/train_prompts.jsonl --stores runs/captured_gain_grid/runs/*/out/feedback \
        --game runs/nash_exploitability/heldout/reference-n64-s0.json runs/nash_exploitability/heldout_prompts.jsonl

The trainers of bench/captured_gain.py stop where the objective wants them along the direction they learn, and
that direction is off the reward (bench/tilt_residuals.py): the policy's implicit reward beta log pi / pi_ref,
learned from the ~1000-2000 replies a run scores, explains 17-27% of VADER's within-prompt variance on pi_ref's
samples. Is that a property of the trainers, or of how much a learner can know about VADER from that many
scored replies? This script answers for two simple learners, nothing sampled and nothing asked of the oracle:
ridge regressions of the reward on a reply's bag of tokens (counts of each token id) and on the optimistic
trainer's all-MiniLM-L6-v2 features of (prompt, reply), within prompt (a prompt's mean reward is not learned),
fitted on N replies drawn from the runs' feedback stores (every scored reply of every run, pi_ref's and the
policies' near it, de-duplicated), scored on pi_ref's own cached samples of the evaluation (never in the fit).
For each N: the within-prompt R^2 of the fitted score on those samples and the G of the policies that tilt
pi_ref's samples along it (`tilted_frontier_estimate` on the empirical footing of `klalign evaluate`): at
c = 1 / beta, the KL-regularised optimum if the fit were the reward (the plug-in policy), and at the best c, the
most the direction can give. The ridge penalty is picked on 1000 other replies of the pool. With --game (issue 23),
the same fits score pi_ref's cached samples of bench/nash_exploitability.py, and the column is the least
exploitability of a tilt along the fit in the game of a Bradley-Terry preference over VADER, as a fraction of
pi_ref's. Rows without a fit: VADER's own lexicon (the oracle's word weights) and VADER itself. A bag of tokens is
one direction a LoRA policy can take (raise some tokens, lower others), not the only one; a diagnostic printed as
a table, never a test.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.linalg import LinearOperator, lsqr
from tilt_residuals import gains_along, within

from klalign.data.datasets import load_prompt_dataset
from klalign.evaluation.exploitability import exploitability_values
from klalign.evaluation.optimum import logsumexp
from klalign.trainers.features import SentenceEmbeddingFeatures

PENALTIES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0]


def pool(stores: list[str], test: set) -> pd.DataFrame:
    """Every scored reply of the feedback stores as (prompt, ids, text, reward), de-duplicated, pi_ref's test samples out."""
    rows = []
    for store in stores:
        for part in sorted(glob.glob(f"{store}/round-*/part-*.parquet")):
            frame = pd.read_parquet(part)
            if "completion_ids" in frame:  # the optimistic / Nash stores: a prompt's k samples in a row
                scored = [(p, c, t, r) for p, ids, ts, rs in zip(frame.prompt, frame.completion_ids, frame.responses,
                                                                frame.rewards) for c, t, r in zip(ids, ts, rs)]
            else:  # iterative DPO's: a pair in a row, each side with its reward
                scored = [(p, c, t, r) for side in ("chosen", "rejected") for p, c, t, r in
                          zip(frame.prompt, frame[f"{side}_ids"], frame[side], frame[f"{side}_reward"])]
            rows += [(json.dumps(json.loads(p), sort_keys=True), tuple(int(t) for t in c), text, float(r))
                     for p, c, text, r in scored]
    frame = pd.DataFrame(rows, columns=["prompt", "ids", "text", "reward"]).drop_duplicates(["prompt", "ids"])
    return frame[[(p, i) not in test for p, i in zip(frame.prompt, frame.ids)]].reset_index(drop=True)


def counts(ids: list[tuple], vocab: int) -> csr_matrix:
    """Bag of tokens. (N, vocab)"""
    cols = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])
    rows = np.repeat(np.arange(len(ids)), [len(i) for i in ids])
    return csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(ids), vocab))


def centring(groups: np.ndarray):
    """u -> u minus its group's mean: a symmetric projection, so within-prompt least squares is lsqr on it."""
    codes, inverse = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(codes))

    def centre(u: np.ndarray) -> np.ndarray:
        return u - (np.bincount(inverse, weights=u, minlength=len(codes)) / sizes)[inverse]
    return centre


def fit(x: csr_matrix, y: np.ndarray, groups: np.ndarray, penalty: float) -> np.ndarray:
    """Within-prompt ridge: argmin_w |C (y - x w)|^2 + penalty |w|^2, C the centring by prompt. (vocab,)"""
    centre = centring(groups)
    op = LinearOperator(x.shape, matvec=lambda w: centre(x @ w), rmatvec=lambda u: x.T @ centre(u), dtype=float)
    return lsqr(op, centre(y), damp=np.sqrt(penalty), atol=1e-8, btol=1e-8, iter_lim=2000)[0]


def game_ratio(reward: np.ndarray, score: np.ndarray, beta: float, temperature: float) -> tuple[float, float]:
    """The least exploitability, over c >= 0, of the tilts of pi_ref's samples by c x score in the beta-regularised
    game of a Bradley-Terry preference over the reward, on the samples' empirical law (policy weights w over them:
    E = beta log mean_i exp(P(y_i > w) / beta) + beta KL(w || uniform) - 1/2, `klalign.estimate_exploitability`'s
    formula), as a fraction of pi_ref's own; and the best c. (P, n) each"""
    n = reward.shape[1]
    wins = 1 / (1 + np.exp(-(reward[:, :, None] - reward[:, None, :]) / temperature))  # (P, n, n) P(y_i > y_k)

    def value(c: float) -> float:
        logw = c * score - logsumexp(c * score, axis=1)[:, None]  # (P, n) log weights
        against = (wins * np.exp(logw)[:, None, :]).sum(-1)  # (P, n) P(y_i > pi_c)
        kl = (np.exp(logw) * (logw + np.log(n))).sum(-1)  # (P,) KL(pi_c || empirical pi_ref)
        # the estimator's own formula, with pi_c as one exact "sample" column: its P(y_i > pi) and its KL
        return float(exploitability_values(against[..., None], kl[:, None], beta).mean())

    cs = [0.0] + list(np.geomspace(0.01, 100, 81) / np.abs(within(score)).mean())
    c, best = min(((c, value(c)) for c in cs), key=lambda t: t[1])
    return best / value(0.0), c


def comparisons(groups: np.ndarray, rows: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n pairs (a, b) of distinct rows with the same prompt, a uniform over rows. (n,) each"""
    by_prompt: dict = {}
    for r in rows:
        by_prompt.setdefault(groups[r], []).append(r)
    a = rows[rng.integers(0, len(rows), n)]
    b = np.empty_like(a)
    for k, i in enumerate(a):
        mine = by_prompt[groups[i]]
        while (j := mine[rng.integers(0, len(mine))]) == i:
            pass
        b[k] = j
    return a, b


def r2_within(score: np.ndarray, reward: np.ndarray) -> float:
    """Squared within-prompt correlation of a score with the reward. (P, n) each"""
    s, r = within(score).ravel(), within(reward).ravel()
    return float(np.corrcoef(s, r)[0, 1] ** 2)


def lexicon_sum(texts: list[str]) -> np.ndarray:
    """The sum of VADER's own valences of a reply's words: the additive word-level direction with the oracle's own
    weights, learned from no data (VADER adds negation, intensifiers, caps and a saturating norm on top)."""
    from vader import (
        SentimentIntensityAnalyzer,  # the `nltk-vader-sentiment` package; no downloads
    )

    lexicon = SentimentIntensityAnalyzer().lexicon
    return np.asarray([sum(lexicon.get(w, 0.0) for w in re.findall(r"[a-z']+", t.lower())) for t in texts])


class Samples:
    """A fixed set of pi_ref's samples to score fits on: prompts (P,), rewards (P, n), token ids and texts (P * n,)."""

    def __init__(self, prompts: list, rewards: np.ndarray, ids: list[tuple], texts: list[str]):
        self.prompts, self.rewards, self.ids, self.texts = prompts, rewards, ids, texts

    def features(self, name: str, vocab: int, phi=None):
        if name == "tokens":
            return counts(self.ids, vocab)
        n = self.rewards.shape[1]
        return phi([p for p in self.prompts for _ in range(n)], self.texts).numpy()


def evaluation_samples(evaluation: str, prompts_path: str) -> Samples:
    """pi_ref's samples cached by a `klalign evaluate` (with their rewards)."""
    (ref_file,) = Path(evaluation, "cache").glob("reference-*.json")
    ref = json.loads(ref_file.read_text())
    prompts = list(load_prompt_dataset(prompts_path)["prompt"])
    assert len(prompts) == len(ref["rewards"]), "the prompt file is not the evaluation's"
    return Samples(prompts, np.asarray(ref["rewards"]), [tuple(c) for per in ref["completion_ids"] for c in per],
                   [t for per in ref["texts"] for t in per])


def game_samples(reference: str, prompts_path: str) -> Samples:
    """pi_ref's samples cached by bench/nash_exploitability.py (reference-n*.json), scored by VADER here."""
    from klalign.oracles.reward_functions import vader_sentiment

    rows = json.loads(Path(reference).read_text())  # (P, n) of {prompt_ids, completion_ids, text}
    prompts = list(load_prompt_dataset(prompts_path)["prompt"])
    assert len(prompts) == len(rows), "the prompt file is not the reference's"
    texts = [s["text"] for per in rows for s in per]
    rewards = np.asarray(vader_sentiment([None] * len(texts), texts)).reshape(len(rows), -1)
    return Samples(prompts, rewards, [tuple(s["completion_ids"]) for per in rows for s in per], texts)


def curve(name: str, frame: pd.DataFrame, valid: np.ndarray, rest: np.ndarray, test: Samples, game: Samples | None,
          vocab: int, args, rng) -> list[str]:
    """The table's rows of one feature set: for each N, fits on N replies drawn from `rest` (args.repeats draws)."""
    phi = SentenceEmbeddingFeatures() if name == "minilm" else None  # the optimistic trainer's feature map
    x = counts(list(frame.ids), vocab) if name == "tokens" else phi([json.loads(p) for p in frame.prompt],
                                                                      list(frame.text)).numpy()
    test_x = test.features(name, vocab, phi)
    game_x = game.features(name, vocab, phi) if game else None
    y, groups = frame.reward.to_numpy(), frame.prompt.to_numpy()
    centre = centring(groups[valid])

    def valid_r2(w: np.ndarray) -> float:
        return float(np.corrcoef(centre(x[valid] @ w), centre(y[valid]))[0, 1] ** 2)

    grid, lines = list(np.geomspace(1 / 8, 8, 49) / args.beta), []
    for n in [s for s in args.sizes if s <= len(rest) or args.labels == "comparisons"]:
        results = []
        for repeat in range(args.repeats):
            if args.labels == "rewards":
                part = rest[rng.permutation(len(rest))[:n]]
                penalty, w = max(((p, fit(x[part], y[part], groups[part], p)) for p in PENALTIES),
                                 key=lambda t: valid_r2(t[1]))
            else:  # n Bradley-Terry comparisons of two replies to one prompt, the label drawn
                a, b = comparisons(groups, rest, n, rng)
                wins = rng.random(n) < 1 / (1 + np.exp(-(y[a] - y[b]) / args.bt_temperature))
                diff, target = x[a] - x[b], wins - 0.5
                penalty, w = max(((p, lsqr(diff, target, damp=np.sqrt(p), atol=1e-8, btol=1e-8, iter_lim=2000)[0])
                                  for p in PENALTIES), key=lambda t: valid_r2(t[1]))
            score = (test_x @ w).reshape(test.rewards.shape)
            (_, plug_in, _), = gains_along(test.rewards, score, [1 / args.beta], args.beta)
            c, best, _ = max(gains_along(test.rewards, score, grid, args.beta), key=lambda t: t[1])
            ratio = (game_ratio(game.rewards, (game_x @ w).reshape(game.rewards.shape), args.game_beta,
                                args.bt_temperature)[0] if game else np.nan)
            results.append((penalty, r2_within(score, test.rewards), plug_in, c * args.beta, best, ratio))
        mean, spread = np.mean(results, axis=0), np.std([r[1:] for r in results], axis=0)
        lines.append(f"| {name} | {n} | {np.median([r[0] for r in results]):g} | {mean[1]:.2f} ± {spread[0]:.2f} | "
                     f"{mean[2]:.2f} ± {spread[1]:.2f} | {mean[3]:.2f} | {mean[4]:.2f} ± {spread[3]:.2f} |"
                     + (f" {mean[5]:.2f} ± {spread[4]:.2f} |" if game else ""))
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluation", required=True, help="A `klalign evaluate` output_dir (its cache/reference-*.json).")
    parser.add_argument("--prompts", required=True, help="That evaluation's prompt_dataset_path.")
    parser.add_argument("--stores", nargs="+", required=True, help="Feedback store folders (<run>/out/feedback).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000, 8000])
    parser.add_argument("--repeats", type=int, default=3, help="Draws of the N replies per size.")
    parser.add_argument("--beta", type=float, default=0.25)
    parser.add_argument("--features", nargs="+", choices=["tokens", "minilm"], default=["tokens", "minilm"],
                        help="A reply's bag of tokens, or the optimistic trainer's all-MiniLM-L6-v2 features of (prompt, reply).")
    parser.add_argument("--labels", choices=["rewards", "comparisons"], default="rewards",
                        help="Fit on N scored replies (issue 19's oracle), or on N Bradley-Terry comparisons over VADER "
                        "with drawn labels (the Nash trainers' oracle; a linear probability model on feature differences).")
    parser.add_argument("--game", nargs=2, metavar=("REFERENCE_JSON", "PROMPTS"), default=None,
                        help="Also the game: pi_ref's samples cached by bench/nash_exploitability.py and their prompts.")
    parser.add_argument("--game-beta", type=float, default=0.1, help="The game's beta (bench/nash_exploitability.py's).")
    parser.add_argument("--bt-temperature", type=float, default=0.25, help="Its Bradley-Terry temperature over VADER.")
    args = parser.parse_args()
    started = time.time()
    test = evaluation_samples(args.evaluation, args.prompts)
    game = game_samples(*args.game) if args.game else None
    keys = [json.dumps(p, sort_keys=True) for p in test.prompts]
    frame = pool(args.stores, set(zip([k for k in keys for _ in range(test.rewards.shape[1])], test.ids)))
    frame = frame[frame.prompt.isin(keys)].reset_index(drop=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(frame))
    valid, rest = order[:1000], order[1000:]  # rows of frame
    print(f"{len(frame)} distinct scored replies of {len(args.stores)} stores on {frame.prompt.nunique()} prompts "
          f"(1000 for the penalty, {len(rest)} to draw from); test: pi_ref's {test.rewards.size} cached samples.", flush=True)
    grid = list(np.geomspace(1 / 8, 8, 49) / args.beta)
    lines = ["| features | " + ("replies" if args.labels == "rewards" else "comparisons") + " fitted on | penalty | within-prompt R^2 on pi_ref's samples | G of the plug-in tilt "
             "(c = 1 / beta) | best c x beta | G at best c |" + (" least exploitability / pi_ref's (game) |" if game else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if game else "")]
    vocab = 1 + max(max(max(i) for i in frame.ids), *(max(max(i) for i in s.ids) for s in (test, game) if s))
    for name in args.features:
        lines += curve(name, frame, valid, rest, test, game, vocab, args, rng)
    for name, score_of in (("VADER's lexicon, summed over words (no fit)", lambda s: lexicon_sum(s.texts)),
                           ("the same sum through VADER's norm x / sqrt(x^2 + 15)",
                            lambda s: lexicon_sum(s.texts) / np.sqrt(lexicon_sum(s.texts) ** 2 + 15)),
                           ("VADER itself", lambda s: s.rewards.ravel())):
        score = score_of(test).reshape(test.rewards.shape)
        c, best, _ = max(gains_along(test.rewards, score, grid, args.beta), key=lambda t: t[1])
        ratio = (game_ratio(game.rewards, score_of(game).reshape(game.rewards.shape), args.game_beta,
                            args.bt_temperature)[0] if game else None)
        lines.append(f"| {name} | - | - | {r2_within(score, test.rewards):.2f} | - | {c * args.beta:.2f} | {best:.2f} |"
                     + (f" {ratio:.2f} |" if game else ""))
    print(f"\nbeta {args.beta}; mean ± sd over {args.repeats} draws of the replies; "
          f"{(time.time() - started) / 60:.1f} min.\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
