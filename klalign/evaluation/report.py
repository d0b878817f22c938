"""The files `klalign evaluate` writes: CSV, JSON, a Markdown table and a reward-vs-KL plot.

ALGORITHMS.md section 4: "A plot of reward against KL is what users look at". Checkpoints are
drawn at their k3 KL estimate (non-negative, lower variance than k1) with standard-error bars; the
best-of-N curve at Beirami et al. 2024's bound and at their estimator; the tilted frontier from the
reference's samples (Yang et al. 2024: best-of-N and the tilt trace nearly the same curve).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

CSV_COLUMNS = [
    "kind", "name", "step", "n", "lam", "reward", "reward_se", "kl_k1", "kl_k1_se", "kl_k3", "kl_k3_se",
    "win_rate", "win_rate_se", "kl_bound", "kl_estimate", "reward_empirical", "kl_empirical", "kl", "ess",
    "beta", "j_star", "j_star_se", "objective", "objective_se", "gain", "gain_se", "kl_to_optimum",
    "kl_to_optimum_se", "tilt_scale", "tilt_scale_se", "tilt_r2", "tilt_r2_se", "ess_min", "response_tokens", "path",
]


def csv_rows(report) -> list[dict]:
    """Every point of the report as one flat row; `kind` is reference, checkpoint, best_of_n or frontier."""
    rows = [{"kind": "reference", **report.reference}]
    rows += [{"kind": "checkpoint", **row} for row in report.checkpoints]
    rows += [{"kind": "best_of_n", "name": f"best-of-{row['n']}", **row} for row in report.best_of_n]
    rows += [{"kind": "frontier", "name": f"tilt lam={row['lam']:g}", **row} for row in report.frontier]
    return rows


def _pm(mean: float, se: float) -> str:
    return f"{mean:.4f} ± {se:.4f}"


def markdown_table(report) -> str:
    """Three Markdown tables: the models, the best-of-N curve and the tilted frontier."""
    s = report.settings
    lines = [
        f"Reward vs KL to the reference `{s['reference_model_path']}` on {s['num_prompts']} prompts x "
        f"{s['num_samples']} samples (reward `{s['reward']}`; ± one standard error over the samples, "
        "given the prompts; the win rate's, over the prompts). Win rate: by the reward, each sample against "
        "every reference sample of its prompt, ties counted half.",
        "",
        "| model | step | reward | KL k1 | KL k3 | win rate vs reference | response tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in [report.reference, *report.checkpoints]:
        step = "" if row["step"] is None else row["step"]
        lines.append(
            f"| {row['name']} | {step} | {_pm(row['reward'], row['reward_se'])} | {_pm(row['kl_k1'], row['kl_k1_se'])}"
            f" | {_pm(row['kl_k3'], row['kl_k3_se'])} | {_pm(row['win_rate'], row['win_rate_se'])}"
            f" | {row['response_tokens']:.1f} |"
        )
    if s.get("beta"):
        lines += optimum_table(report)
    lines += [
        "",
        "Best-of-N from the reference's samples (unbiased over N-subsets); KL by Beirami et al.'s bound and estimator.",
        "",
        "Beside them, on the tilted frontier's footing: best-of-N of the reference samples' empirical law (exact).",
        "",
        "| N | reward | KL bound | KL estimate | empirical: reward | empirical: KL |" + (" J = reward - beta KL estimate |" if s.get("beta") else ""),
        "|---:|---:|---:|---:|---:|---:|" + ("---:|" if s.get("beta") else ""),
    ]
    for row in report.best_of_n:
        se = "n/a" if row["reward_se"] != row["reward_se"] else f"{row['reward_se']:.4f}"
        objective = f" {row['objective']:.4f} |" if "objective" in row else ""
        lines.append(f"| {row['n']} | {row['reward']:.4f} ± {se} | {row['kl_bound']:.4f} | {row['kl_estimate']:.4f} |"
                     f" {row['reward_empirical']:.4f} | {row['kl_empirical']:.4f} |{objective}")
    lines += [
        "",
        f"Tilted frontier pi_ref * exp(lam * r) by self-normalised weights over the reference's samples "
        f"(KL saturates at log n = log {s['num_samples']}; trust it while ESS is large).",
        "",
        "| lam | reward | KL | ESS |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['lam']:g} | {r['reward']:.4f} | {r['kl']:.4f} | {r['ess']:.2f} |" for r in report.frontier]
    return "\n".join(lines) + "\n"


def optimum_table(report) -> list[str]:
    """The KL-regularised objective at the run's beta (klalign.evaluation.optimum): J, the captured gain G and
    KL to the optimum per model, J* and the reference samples' effective sample size."""
    ref = report.reference
    lines = [
        "",
        f"The objective J = E r - beta KL(pi || pi_ref) at beta {ref['beta']:g}: its optimum J* = "
        f"{_pm(ref['j_star'], ref['j_star_se'])} (log-mean-exp of the reference's samples; their effective "
        f"sample size {ref['ess']:.1f} per prompt, smallest {ref['ess_min']:.1f}); captured gain "
        "G = (J - J(pi_ref)) / (J* - J(pi_ref)), 1 at the optimum; KL(pi || pi*) = (J* - J) / beta. "
        "Tilt scale a and R^2: the within-prompt regression of the log-ratio log pi / pi_ref on the reward "
        "(every tilt pi_ref exp(a r / beta) has scale a and R^2 1; the optimum a = 1; R^2 below 1: KL spent off "
        "the reward). ± one standard error by a bootstrap over each prompt's samples.",
        "",
        "| model | J | G | KL(pi \|\| pi*) | tilt scale a | R^2 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in [ref, *report.checkpoints]:
        fit = [_pm(row[k], row[f"{k}_se"]) if row.get(k) is not None else "-" for k in ("tilt_scale", "tilt_r2")]
        lines.append(f"| {row['name']} | {_pm(row['objective'], row['objective_se'])} | "
                     f"{_pm(row['gain'], row['gain_se'])} | {_pm(row['kl_to_optimum'], row['kl_to_optimum_se'])} | "
                     f"{fit[0]} | {fit[1]} |")
    return lines


def plot_tradeoff(report, path: Path) -> None:
    """Reward against KL: checkpoints (k3, error bars), best-of-N (bound and estimate), frontier."""
    from matplotlib.figure import (
        Figure,  # the Figure API needs no pyplot state and renders with Agg
    )

    fig = Figure(figsize=(7, 5), dpi=120)
    ax = fig.subplots()
    frontier = sorted(report.frontier, key=lambda r: r["kl"])
    n = report.settings["num_samples"]
    ax.plot([r["kl"] for r in frontier], [r["reward"] for r in frontier], "-", color="tab:green",
            label=f"tilt of the {n} reference samples per prompt (exact on their empirical law)")
    bon = report.best_of_n
    ax.plot([r["kl_empirical"] for r in bon], [r["reward_empirical"] for r in bon], "^-", color="tab:green",
            alpha=0.6, mfc="none", label=f"best-of-N of the same {n} samples (exact on their empirical law)")
    ax.plot([r["kl_bound"] for r in bon], [r["reward"] for r in bon], "o-", color="tab:orange",
            label="best-of-N of pi_ref: reward by U-statistic, KL bound log N - (N-1)/N")
    ax.plot([r["kl_estimate"] for r in bon], [r["reward"] for r in bon], "s--", color="tab:orange", alpha=0.6,
            mfc="none", label="best-of-N of pi_ref: reward by U-statistic, KL estimate D(eps)")
    for r in bon:
        ax.annotate(f"N={r['n']}", (r["kl_bound"], r["reward"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7, color="tab:orange")
    ref = report.reference
    ax.errorbar([0.0], [ref["reward"]], yerr=[ref["reward_se"]], fmt="k*", markersize=10, capsize=3,
                label="reference")
    rows = report.checkpoints
    ax.errorbar([r["kl_k3"] for r in rows], [r["reward"] for r in rows], xerr=[r["kl_k3_se"] for r in rows],
                yerr=[r["reward_se"] for r in rows], fmt="o", color="tab:blue", capsize=3,
                label="checkpoints (KL k3 ± SE)")
    labels: dict[tuple, list[str]] = {}  # identical weights give identical points: one label for them
    for r in rows:
        labels.setdefault((r["kl_k3"], r["reward"]), []).append(r["name"])
    for i, (xy, names) in enumerate(labels.items()):  # left of the point, alternately above and below
        ax.annotate(" = ".join(names), xy, textcoords="offset points", xytext=(-6, 6 if i % 2 == 0 else -12),
                    ha="right", fontsize=7, color="tab:blue")
    # A checkpoint far beyond the reach of n reference samples (their curves stop near log n) would
    # squash both curves against the axis: a symlog axis keeps them readable and the checkpoint on screen.
    reach = max([r["kl_bound"] for r in bon] + [r["kl"] for r in frontier] + [1e-3])
    wide = max([r["kl_k3"] for r in rows], default=0.0) > 10 * reach
    if wide:
        ax.set_xscale("symlog", linthresh=min(0.1, reach))
    ax.set_xlabel("KL(policy || reference) [nats]" + (", symlog scale" if wide else ""))
    ax.set_ylabel(f"mean reward ({report.settings['reward']})")
    ax.set_title("Reward vs KL to the reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(report, output_dir: str | Path) -> dict[str, str]:
    """Write tradeoff.{csv,json,md,png} into `output_dir`; return their paths by kind."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: output_dir / f"tradeoff.{kind}" for kind in ("csv", "json", "md", "png")}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv_rows(report))
    record = {k: v for k, v in asdict(report).items() if k != "paths"}
    paths["json"].write_text(json.dumps(record, indent=2))
    paths["md"].write_text(markdown_table(report))
    plot_tradeoff(report, paths["png"])
    return {kind: str(path) for kind, path in paths.items()}
