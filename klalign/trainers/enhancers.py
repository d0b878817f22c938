"""GSHF enhancers: how the exploring response of each (main, enhancer) pair is chosen.

Xiong et al. (ICML 2024), section 4 ("Online iterative RLHF", the enhancer explores where the
main agent exploits) and ALGORITHMS.md section 2 list the practical choices implemented here.
Each enhancer proposes one pair per prompt (all_pairs: every pair of a prompt's samples);
`IterativeDPOTrainer` asks the oracle to label it unless the enhancer already ranked it with a reward.
Every choice is seeded by the online loop, and everything an enhancer keeps between rounds is on disk,
so a resumed run proposes the same pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from klalign.generation.types import Completion
from klalign.inference.rejection_sampling import rejection_sample
from klalign.models.snapshots import full_snapshot, swapped


@dataclass
class PairProposal:
    """Two responses to one prompt, which policy produced each, and what is known about them."""

    prompt: object
    a: Completion
    b: Completion
    policy_a: str
    policy_b: str
    main: Completion  # a main-agent sample, for the per-round KL estimate
    ranked: bool = False  # True when the enhancer already knows the preference (from rewards)
    a_preferred: bool | None = None
    reward_a: float | None = None
    reward_b: float | None = None
    main_reward: float | None = None
    preference_prob: float | None = None
    queries: int = 0


class Enhancer:
    needs_reward = False

    def __init__(self, trainer):
        self.trainer = trainer
        self.args = trainer.args

    def propose(self, round_index: int, prompts: list) -> list[PairProposal]:
        raise NotImplementedError

    def _scored_samples(self, prompts: list):
        """n main-agent samples per prompt and their rewards: ([[Completion]], (P, n) tensor)."""
        n = self.args.samples_per_prompt
        samples = self.trainer.generate(prompts, n)
        flat_prompts = [p for p in prompts for _ in range(n)]
        flat = [c.text for per_prompt in samples for c in per_prompt]
        rewards = self.trainer.oracle.score(flat_prompts, flat).view(len(prompts), n)
        return samples, rewards


class BestVsWorst(Enhancer):
    """The best of n main-agent samples against the worst, ranked by the reward (n queries a prompt)."""

    needs_reward = True

    def propose(self, round_index, prompts):
        samples, rewards = self._scored_samples(prompts)
        out = []
        for prompt, cands, r in zip(prompts, samples, rewards):
            best, worst = int(r.argmax()), int(r.argmin())
            out.append(PairProposal(
                prompt, cands[best], cands[worst], "main:best", "main:worst", main=cands[0], ranked=True,
                a_preferred=None if r[best] == r[worst] else True, reward_a=r[best].item(),
                reward_b=r[worst].item(), main_reward=r.mean().item(), queries=len(cands),
            ))
        return out


class AllPairs(Enhancer):
    """Every pair of n main-agent samples, ranked by the reward (n queries a prompt, n (n - 1) / 2 pairs).

    With expected labels each pair asks the policy for a log-ratio margin of (r_a - r_b) / beta, so pairs of
    close rewards (two positive replies in different styles) teach that what separates them is worth little.
    Best-vs-worst pairs never show that, and on SmolLM2 + VADER DPO on them learns a style that separates the
    pairs as well as the reward does (docs/captured_gain.md, "Noise or bias?")."""

    needs_reward = True

    def propose(self, round_index, prompts):
        samples, rewards = self._scored_samples(prompts)
        out = []
        for prompt, cands, r in zip(prompts, samples, rewards):
            for k, (i, j) in enumerate(combinations(range(len(cands)), 2)):
                hi, lo = (i, j) if r[i] >= r[j] else (j, i)
                # Both replies are the main agent's; the KL statistics take the first by index (by reward would
                # weight the high-reward samples, whose log-ratios are larger).
                out.append(PairProposal(
                    prompt, cands[hi], cands[lo], f"main:{hi}", f"main:{lo}", main=cands[i], ranked=True,
                    a_preferred=None if r[hi] == r[lo] else True, reward_a=r[hi].item(), reward_b=r[lo].item(),
                    main_reward=r.mean().item(), queries=len(cands) if k == 0 else 0,  # n queries, charged once
                ))
        return out


class RejectionSampling(Enhancer):
    """RSO's statistical rejection sampling toward pi_t * exp(r / beta) on n main-agent samples;
    the best and worst accepted samples form the pair (best vs worst of all n if fewer than two pass)."""

    needs_reward = True

    def propose(self, round_index, prompts):
        samples, rewards = self._scored_samples(prompts)
        out = []
        for prompt, cands, r in zip(prompts, samples, rewards):
            kept = rejection_sample(r, self.args.beta).nonzero().flatten()
            pool = kept if len(kept) >= 2 else torch.arange(len(cands))
            best, worst = int(pool[r[pool].argmax()]), int(pool[r[pool].argmin()])
            out.append(PairProposal(
                prompt, cands[best], cands[worst], "main:rso_best", "main:rso_worst", main=cands[0], ranked=True,
                a_preferred=None if r[best] == r[worst] else True, reward_a=r[best].item(),
                reward_b=r[worst].item(), main_reward=r.mean().item(), queries=len(cands),
            ))
        return out


class Temperature(Enhancer):
    """The main agent at its temperature against the same policy at `enhancer_temperature`."""

    def propose(self, round_index, prompts):
        main = self.trainer.generate(prompts, 1)
        explore = self.trainer.generate(prompts, 1, temperature=self.args.enhancer_temperature)
        return [PairProposal(p, m[0], e[0], "main", f"temperature:{self.args.enhancer_temperature}", main=m[0],
                             queries=1) for p, m, e in zip(prompts, main, explore)]


class PreviousCheckpoint(Enhancer):
    """The main agent against the policy of the previous round (round 0: against itself).

    Snapshots of the trainable parameters (the adapter with LoRA; every weight otherwise) are kept
    on disk, one per round start, so a resumed run finds them.
    """

    def _snapshot_path(self, round_index: int) -> Path:
        return Path(self.args.output_dir) / "policy_snapshots" / f"round-{round_index:05d}.safetensors"

    def propose(self, round_index, prompts):
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        path = self._snapshot_path(round_index)
        missing = [not path.exists()]
        broadcast_object_list(missing)  # the main process decides: every process must join the snapshot
        if missing[0]:
            snapshot = full_snapshot(model)  # full values for the file: a collective under ZeRO-3, on every process
            if self.args.should_save:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous().cpu() for k, v in snapshot.items()}, str(tmp))
                tmp.replace(path)
            del snapshot
        trainer.accelerator.wait_for_everyone()
        main = trainer.generate(prompts, 1)
        previous = load_file(str(self._snapshot_path(max(round_index - 1, 0))), device=str(self.args.device))
        with swapped(model, previous):  # pi_{t-1} (each process writes its own slice), sampled the policy's way
            explore = trainer.generate(prompts, 1, weights=("previous", round_index))
        stale = self._snapshot_path(round_index - 2)
        if self.args.should_save and stale.exists():
            stale.unlink()
        return [PairProposal(p, m[0], e[0], "main", "previous_checkpoint", main=m[0], queries=1)
                for p, m, e in zip(prompts, main, explore)]


class Uncertainty(Enhancer):
    """Of n main-agent samples, the pair with the largest ||phi1 - phi2||_{Sigma^-1} (Xiong et al.,
    the uncertainty-based enhancer). phi: the reference's last hidden state averaged over the
    response tokens (frozen); Sigma = lam I + sum over all stored pairs of d d^T, d = phi1 - phi2,
    rebuilt from the store each round so a resumed run sees the same Sigma."""

    def propose(self, round_index, prompts):
        sigma_inv = self._sigma_inverse(round_index)  # (d, d)
        samples = self.trainer.generate(prompts, self.args.samples_per_prompt)
        out = []
        for prompt, cands in zip(prompts, samples):
            phi = self._features([c.prompt_ids for c in cands], [c.completion_ids for c in cands])  # (n, d)
            diff = phi[:, None, :] - phi[None, :, :]  # (n, n, d)
            width = torch.einsum("ijd,de,ije->ij", diff, sigma_inv, diff)  # (n, n)
            i, j = divmod(int(width.argmax()), len(cands))
            d = diff[i, j][:, None]  # (d, 1): Sherman-Morrison update with the chosen pair
            sigma_inv = sigma_inv - (sigma_inv @ d @ d.T @ sigma_inv) / (1 + d.T @ sigma_inv @ d)
            out.append(PairProposal(prompt, cands[i], cands[j], "main", "uncertainty", main=cands[0], queries=1))
        return out

    def _sigma_inverse(self, round_index: int) -> torch.Tensor:
        rows = [r for past in range(round_index) for r in self.trainer.store.round_rows(past)]
        dim = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped).config.get_text_config().hidden_size
        sigma = self.args.uncertainty_ridge * torch.eye(dim, dtype=torch.float64, device=self.args.device)
        for start in range(0, len(rows), 32):
            part = rows[start : start + 32]
            prompts = [r["prompt_ids"] for r in part]
            a = self._features(prompts, [r["chosen_ids"] for r in part])
            b = self._features(prompts, [r["rejected_ids"] for r in part])
            d = a - b  # (B, d)
            sigma += d.T @ d
        return torch.linalg.inv(sigma)

    @torch.no_grad()
    def _features(self, prompt_ids, completion_ids) -> torch.Tensor:
        """Mean last hidden state of the reference over the response tokens. (B, d) float64"""
        batch = self.trainer.batch(prompt_ids, completion_ids)
        mask = batch.pop("completion_mask").unsqueeze(-1).to(torch.float64)  # (B, T, 1)
        with self.trainer.reference.forward_model(self.trainer.model_wrapped) as model:
            hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[-1]  # (B, T, d)
        return (hidden.to(torch.float64) * mask).sum(1) / mask.sum(1).clamp(min=1)


ENHANCERS: dict[str, type[Enhancer]] = {
    "best_vs_worst": BestVsWorst,
    "all_pairs": AllPairs,
    "temperature": Temperature,
    "previous_checkpoint": PreviousCheckpoint,
    "rejection_sampling": RejectionSampling,
    "uncertainty": Uncertainty,
}
