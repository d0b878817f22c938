"""Each strengthened test of issue 15 against a deliberately broken variant of the code it guards.

    python tests/scripts/broken_variants.py                  # every variant (about 5 min on 2 CPU cores)
    python tests/scripts/broken_variants.py --only sppo_unregularised,no_half_step

A variant is one textual edit of one source file (it must match exactly once). For each, the tracked
tree is copied to a scratch folder, the edit applied there, and the tests that should catch it run
with pytest; the table says whether they failed (as they must) and the first assertion line. The
unedited tree is run first on the same tests, which must pass. Nothing here edits the working tree.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NASH, ITER, OPT = "tests/test_nash_mp.py", "tests/test_iterative_dpo.py", "tests/test_optimistic.py"

# name: (file, old text, new text, tests that must fail, what the edit breaks)
VARIANTS = {
    "no_half_step": (
        "klalign/trainers/nash.py", "opponent = take_snapshot(self._policy)", "opponent = anchor",
        [f"{NASH}::test_trainer_follows_the_exact_nash_mp_path"],
        "Nash-MP's full step plays pi_k instead of pi_k+1/2 (mirror descent at twice the queries)"),
    "mirror_descent_with_half_step": (
        "klalign/trainers/nash_methods.py", '"mirror_descent": NashMethod(("full",)',
        '"mirror_descent": NashMethod(("half", "full")',
        [f"{NASH}::test_baselines_follow_their_exact_paths[mirror_descent]"],
        "method: mirror_descent runs Nash-MP's two prox steps"),
    "nash_mp_keeps_optimizer_state": (
        "klalign/trainers/nash_methods.py",
        '"nash_mp": NashMethod(("half", "full"), "policy_vs_opponent", "policy_gradient", "fresh"',
        '"nash_mp": NashMethod(("half", "full"), "policy_vs_opponent", "policy_gradient", "continue"',
        [f"{NASH}::test_full_step_restarts_from_theta_k_with_fresh_optimizer_state"],
        "Nash-MP's prox steps share Adam's moments"),
    "online_ipo_unregularised": (
        "klalign/trainers/nash.py", "base, tau, stats = ref, self.args.beta, {}",
        "base, tau, stats = (logps.detach() if self.args.method == 'online_ipo' else ref), self.args.beta, {}",
        [f"{NASH}::test_each_self_play_method_lands_on_the_regularised_nash_equilibrium[online_ipo]"],
        "online IPO without its KL to pi_ref (plain self-play policy gradient)"),
    "online_ipo_resets_optimizer": (
        "klalign/trainers/nash_methods.py", '"self_play", "self_play_ipo", "continue"',
        '"self_play", "self_play_ipo", "fresh"',
        [f"{NASH}::test_online_ipo_samples_pairs_of_the_current_policy_and_keeps_its_optimizer_state"],
        "online IPO clears its optimizer state every round (not a single loop)"),
    "egpo_no_restore": (
        "klalign/trainers/nash.py", "self._restore_optimizer_state(saved)\n", "pass\n",
        [f"{NASH}::test_egpo_full_step_restarts_from_theta_k_with_the_saved_optimizer_state"],
        "EGPO's full step keeps the half step's optimizer state"),
    "egpo_full_step_from_half": (
        "klalign/trainers/nash.py", "reset(self._policy, start, engine)", "pass",
        [f"{NASH}::test_egpo_full_step_restarts_from_theta_k_with_the_saved_optimizer_state",
         f"{NASH}::test_full_step_restarts_from_theta_k_with_fresh_optimizer_state"],
        "the full step continues from theta_k+1/2 instead of restarting at theta_k"),
    "sppo_unregularised": (
        "klalign/trainers/nash.py", "target = (1 - step * beta) * pi_k + step * beta * ref + step * (win_rates - 0.5)",
        "target = pi_k + eta * (win_rates - 0.5)",
        [f"{NASH}::test_each_self_play_method_lands_on_the_regularised_nash_equilibrium[sppo]",
         f"{NASH}::test_sppo_and_nash_prox_follow_their_exact_paths[sppo-0.025]"],
        "SPPO's own target (no pi_ref in the anchor): the unregularised game's fixed point"),
    "sppo_win_rate_with_self": (
        "klalign/trainers/nash.py", "win_rates = wins.sum(-1) / (K - 1)", "win_rates = (wins.sum(-1) + 0.5) / K",
        [f"{NASH}::test_sppo_estimates_win_rates_leave_one_out_and_regresses_on_pi_k"],
        "SPPO's win rate counts the sample against itself (biased toward 1/2)"),
    "nash_prox_wrong_tau": (
        "klalign/trainers/nash.py", "base, tau = w * ref + (1 - w) * pi_k, self.args.beta + 1 / self.args.eta",
        "base, tau = w * ref + (1 - w) * pi_k, self.args.beta",
        [f"{NASH}::test_sppo_and_nash_prox_follow_their_exact_paths[nash_prox-0.05]",
         f"{NASH}::test_each_self_play_method_lands_on_the_regularised_nash_equilibrium[nash_prox]"],
        "Nash Prox forgets the proximal term's weight 1/eta in tau"),
    "optimism_off": (
        "klalign/trainers/reward_learning.py", "r = self.predict(phi) + self.bonus(phi, baseline)",
        "r = self.predict(phi)",
        [f"{OPT}::test_optimism_beats_greedy_where_the_reference_underexplores"],
        "the optimistic learner is the greedy one (no bonus)"),
    "preference_bonus_absolute": (
        "klalign/trainers/reward_learning.py", "        return phi - baseline\n", "        return phi\n",
        [f"{OPT}::test_a_direction_every_response_shares_neither_clips_groups_to_r_max_nor_holds_up_the_bonus",
         "tests/test_reward_learning.py::test_preference_bonus_shrinks_although_every_response_shares_a_direction"],
        "with comparisons the bonus is taken on absolute features again (issue 20, item 8)"),
    "reference_previous_ignored": (
        "klalign/trainers/iterative.py", 'use_previous = self.args.reference == "previous"', "use_previous = False",
        [f"{ITER}::test_reference_option_sets_the_log_ratios_of_the_loss[previous]"],
        'reference: previous takes log-ratios against pi_ref'),
    "uncertainty_first_pair": (
        "klalign/trainers/enhancers.py", "i, j = divmod(int(width.argmax()), len(cands))", "i, j = 0, 1",
        [f"{ITER}::test_uncertainty_enhancer_picks_the_widest_pair"],
        "the uncertainty enhancer proposes the first two candidates"),
    "uncertainty_no_in_round_update": (
        "klalign/trainers/enhancers.py", "sigma_inv = sigma_inv - (sigma_inv @ d @ d.T @ sigma_inv) / (1 + d.T @ sigma_inv @ d)",
        "pass",
        [f"{ITER}::test_uncertainty_enhancer_picks_the_widest_pair"],
        "Sigma is not updated with the pairs proposed earlier in the round"),
    "previous_checkpoint_is_current": (
        "klalign/trainers/enhancers.py", "self._snapshot_path(max(round_index - 1, 0))", "self._snapshot_path(round_index)",
        [f"{ITER}::test_previous_checkpoint_enhancer_samples_the_previous_round_policy"],
        "the previous-checkpoint enhancer samples pi_t"),
    "rejection_rate_wrong_beta": (
        "klalign/trainers/enhancers.py", "kept = rejection_sample(r, self.args.beta)", "kept = rejection_sample(r, 2 * self.args.beta)",
        [f"{ITER}::test_rejection_sampling_enhancer_accepts_at_rso_rate"],
        "rejection sampling accepts at exp((r - max r) / 2 beta)"),
    "open_action_set": (
        "klalign/testbed/bandit.py", "hidden_size: int | None = None, closed: bool = True) -> Path:",
        "hidden_size: int | None = None, closed: bool = False) -> Path:",
        [f"{ITER}::test_full_fine_tuning_cannot_leak_mass_off_the_actions"],
        "the bed is the plain Llama again (the action set is not closed)"),
}


def copy_tree(destination: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(tree: Path, tests: list[str], timeout: int) -> tuple[bool, str, float]:
    """(all passed, first failure line, seconds) of pytest on `tests` in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.time() - started
    lines = out.stdout.splitlines()
    first = next((line.strip() for line in lines if re.match(r"^E\s", line)), lines[-1] if lines else "")
    return out.returncode == 0, first[:160], time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the unedited tree first")
    cli = parser.parse_args()
    names = [n for n in cli.only.split(",") if n] or list(VARIANTS)
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as scratch:
        if not cli.skip_baseline:
            tree = Path(scratch) / "unedited"
            copy_tree(tree)
            tests = sorted({t for n in names for t in VARIANTS[n][3]})
            passed, first, seconds = run_tests(tree, tests, cli.timeout * len(tests))
            print(f"unedited tree, {len(tests)} tests: {'pass' if passed else 'FAIL: ' + first} ({seconds:.0f} s)",
                  flush=True)
            ok &= passed
        for name in names:
            path, old, new, tests, what = VARIANTS[name]
            tree = Path(scratch) / name
            copy_tree(tree)
            text = (tree / path).read_text()
            if text.count(old) != 1:
                raise SystemExit(f"{name}: the edit's text occurs {text.count(old)} times in {path}, not once")
            (tree / path).write_text(text.replace(old, new))
            passed, first, seconds = run_tests(tree, tests, cli.timeout)
            verdict = "NOT CAUGHT" if passed else "caught"
            ok &= not passed
            rows.append((name, what, verdict, first, seconds))
            print(f"{name}: {verdict} ({seconds:.0f} s) {first}", flush=True)
            shutil.rmtree(tree)
    print("\n| broken variant | what it breaks | tests | result | first failure |\n|---|---|---|---|---|")
    for name, what, verdict, first, seconds in rows:
        tests = ", ".join(t.split("::")[1] for t in VARIANTS[name][3])
        print(f"| `{name}` | {what} | {tests} | {verdict} ({seconds:.0f} s) | `{first.replace('|', '/')}` |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
