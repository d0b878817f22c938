"""Whether a vLLM engine's log-probs are the policy's own: a spot check per sampling call (issue 22, item 2).

At temperature 1 and top_p 1 vLLM samples from the policy's own law, and its log-probs of the sampled tokens
differ from the policy's only by its kernels (fp32 SmolLM2-135M: 1.7e-5 nats a token on average, 8e-5 at most;
a bf16 engine 0.04 and 0.26). Rescoring every sample with the policy (a frozen pass) would then only repeat
them. So every `CHECK_EVERY`-th sample of a call is rescored; when no token differs by more than the tolerance,
every sample of the call is marked as the policy's own (`Completion.sampler_is_model`): the trainer keeps vLLM's
log-probs and weights nothing. Otherwise the marks stay off and every sample is rescored and importance-weighted
(`klalign.ops.importance`). The decision is the largest mismatch over all processes, so every process takes the
same branch (a ZeRO-3 pass is collective). A spot check can miss an error confined to a few samples: a tolerance
of None turns it off (every sample rescored).
"""

from __future__ import annotations

from typing import Callable

from accelerate.utils import gather_object

from klalign.ops.importance import mismatch_metrics

CHECK_EVERY = 8  # one sample in 8 rescored: 1.1 s of a 32.7 s SmolLM2 round (docs/bench/round_profile.md)


class SamplerLogprobCheck:
    """The checks of one trainer's vLLM calls; `metrics` reports and clears those since the last report."""

    def __init__(self, tolerance: float | None):
        self.tolerance = tolerance
        self._checks: list[dict] = []  # {"stats": sample_statistics rows, "kept": bool}, one per call

    def keep_if_close(self, samples: list[list], mismatch: Callable[[list], list[dict]]) -> bool:
        """Check one call's `samples` (per prompt, lists of `Completion`) and mark them all as the policy's own
        when the checked ones are within the tolerance. `mismatch(completions)` rescores completions with the
        policy and returns their `klalign.ops.importance.sample_statistics` rows. Returns whether they were kept."""
        if self.tolerance is None:
            return False
        flat = [c for per_prompt in samples for c in per_prompt]
        checked = flat[::CHECK_EVERY]  # (ceil(N / 8),): spread over the prompts, in order
        stats = mismatch(checked) if checked else []
        worst = max(gather_object([max((s["mismatch_max"] for s in stats), default=0.0)]))
        kept = worst <= self.tolerance
        self._checks.append({"stats": stats, "kept": kept})
        if kept:
            for c in flat:
                c.sampler_is_model = True
        return kept

    def metrics(self) -> dict[str, float]:
        """The mismatch on the checked samples (`sampler/mismatch_*`) and the share of calls whose log-probs were
        kept (`sampler/vllm_logprobs_kept`) since the last call; {} without any check."""
        checks, self._checks = self._checks, []
        if not checks:
            return {}
        return {**mismatch_metrics([s for check in checks for s in check["stats"]]),
                "sampler/vllm_logprobs_kept": sum(check["kept"] for check in checks) / len(checks)}
