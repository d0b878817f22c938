"""`OnlineConfig`: the rounds, sampling, KL and correction settings every online trainer shares (plus all of
`transformers.TrainingArguments` and the sampling settings of `GenerationArguments`). YAML keys map 1:1
onto its fields; the checks run while the command line is parsed, before any model loads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from klalign.config.checks import check_training_config
from klalign.generation.types import GenerationArguments
from klalign.models.placement import check_equal_work
from klalign.ops.batching import SHARE_PROMPT_HELP

IMPORTANCE_CORRECTIONS = ("token", "sequence", "none")  # klalign.ops.importance

IMPORTANCE_ALIASES = {"truncated": "sequence"}  # the sequence-level form's earlier name

@dataclass
class OnlineConfig(TrainingArguments, GenerationArguments):
    """Rounds, sampling and KL settings shared by the online trainers (plus all TrainingArguments and the
    sampling settings of GenerationArguments)."""

    beta: float = field(default=0.1, metadata={"help": "KL coefficient beta of J = E r - beta KL(pi || pi_ref)."})
    num_rounds: int = field(default=4, metadata={"help": "Rounds of (collect feedback, update the policy)."})
    prompts_per_round: int = field(default=32, metadata={"help": "Prompts drawn per round (all processes)."})
    prompts_per_chunk: int = field(
        default=8, metadata={"help": "Prompts per stored collection chunk: the unit of work a killed run can lose."}
    )
    importance_correction: str = field(
        default="token",
        metadata={"help": "For samples not drawn from the training model itself (vLLM's kernels and dtype, another "
                          "temperature), truncated importance sampling as TRL and OpenRLHF correct vLLM samples: "
                          "'token' weights each token's policy-gradient and KL terms by min(pi_train(y_t | .) / "
                          "pi_sampler(y_t | .), importance_cap); 'sequence' (alias 'truncated') weights a whole "
                          "sample by min(pi_train(y) / pi_sampler(y), importance_cap), which collapses on long "
                          "responses; 'none': no weights. Samples without sampler log-probs are not weighted."},
    )
    importance_cap: float = field(default=2.0, metadata={"help": "Truncation of the importance weights (> 1)."})
    vllm_logprob_tolerance: float | None = field(
        default=1e-3,
        metadata={"help": "generation_backend vllm at temperature 1 and top_p 1 with an fp32 policy: recompute every "
                          "8th sample's log-probs under the policy, and when no token differs from vLLM's by more "
                          "than this (nats), keep vLLM's log-probs for every sample in place of the policy's frozen "
                          "pass, unweighted; otherwise recompute them all and correct by importance weights. The "
                          "check's mismatch is logged (sampler/mismatch_*). null: always recompute."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Turn every dropout of the policy (LoRA's lora_dropout included) and of the reference off, "
                          "as TRL does: with dropout on, the policy-gradient ratios, the anchors and the KL estimates "
                          "compare two different random networks. Log-probs computed without gradients are taken in "
                          "eval mode either way."},
    )
    kl_warning_threshold: float | None = field(
        default=10.0, metadata={"help": "Warn once per round when the estimated KL(pi || pi_ref) exceeds this (nats)."}
    )
    save_every_rounds: int = field(
        default=1,
        metadata={"help": "Checkpoint every this many rounds (and after the last). A resumed run replays "
                          "later rounds from the stored feedback, so a larger value never re-queries the oracle."},
    )
    feedback_dir: str | None = field(
        default=None, metadata={"help": "Where collected feedback is stored; default: <output_dir>/feedback."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from checkpoint folders to run (off by default)."}
    )
    share_prompt: bool = field(default=True, metadata={"help": SHARE_PROMPT_HELP})
    bf16: bool | None = field(
        default=None, metadata={"help": "bfloat16 mixed precision; default: on when a bf16 GPU is present."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        check_training_config(self)
        for name in ("num_rounds", "prompts_per_round", "prompts_per_chunk", "save_every_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.generation_args()  # validates temperature, top_p, max_new_tokens, the backend
        self.importance_correction = IMPORTANCE_ALIASES.get(self.importance_correction, self.importance_correction)
        if self.vllm_logprob_tolerance is not None and self.vllm_logprob_tolerance < 0:
            raise ValueError(f"vllm_logprob_tolerance must be >= 0 or null, got {self.vllm_logprob_tolerance}")
        if self.importance_correction not in IMPORTANCE_CORRECTIONS or self.importance_cap <= 1:
            raise ValueError(f"importance_correction must be one of {list(IMPORTANCE_CORRECTIONS)} and importance_cap "
                             f"> 1, got {self.importance_correction!r}, {self.importance_cap}")
        if self.on_policy and self.importance_correction == "none" and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ValueError(f"{type(self).__name__}: the policy gradient and the KL estimates need samples from pi "
                             f"itself: set temperature 1 and top_p 1 (got {self.temperature}, {self.top_p}), or "
                             "importance_correction: token")
        if self.warmup_steps >= 1:
            raise ValueError(f"warmup_steps={self.warmup_steps}: the online trainers' learning-rate schedule runs over "
                             "rounds (klalign.trainers.schedule); give the warmup as a fraction of the run (< 1)")
        super().__post_init__()
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: the online trainers take one "
                "optimizer step per batch and do not accumulate; set gradient_accumulation_steps: 1 (also in the "
                "DeepSpeed config) and size the batch with per_device_train_batch_size")
        check_equal_work(self.world_size, **self.equal_work_counts())

    on_policy = False  # True: the trainer's estimates need samples of pi itself (temperature 1, top_p 1)

    def equal_work_counts(self) -> dict[str, int]:
        """Counts of prompts each chunk of work is split by across processes (see `check_equal_work`):
        with both a multiple of the number of processes, so is every chunk, the last one included."""
        return {"prompts_per_round": self.prompts_per_round, "prompts_per_chunk": self.prompts_per_chunk}

    def generation_args(self, temperature: float | None = None) -> GenerationArguments:
        """The sampling settings as `klalign.generation` takes them (every field of GenerationArguments)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationArguments)}
        return GenerationArguments(**{**values, **({} if temperature is None else {"temperature": temperature})})
