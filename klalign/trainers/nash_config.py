"""`NLHFConfig`: the settings of Nash learning from human feedback (`NLHFTrainer`): the method, the prox step size
eta, inner steps, pairs per step, win-rate evaluation (plus `OnlineConfig` and TrainingArguments)."""

from __future__ import annotations

from dataclasses import dataclass, field

from klalign.trainers.nash_methods import METHODS, NashMethod
from klalign.trainers.online_config import OnlineConfig


@dataclass
class NLHFConfig(OnlineConfig):
    """Settings of Nash-MP and the other NLHF methods of `NLHFTrainer` (plus OnlineConfig and TrainingArguments)."""

    method: str = field(default="nash_mp", metadata={"help": f"The iteration, one of {list(METHODS)}."})
    eta: float = field(
        default=2.0,
        metadata={"help": "Prox step size eta (Tiapkin et al.: eta = 2) of nash_mp, mirror_descent, nash_md, sppo "
                          "and nash_prox; Nash-MD needs eta * beta <= 1. online_ipo and egpo step by the learning rate."},
    )
    inner_steps: int = field(
        default=4, metadata={"help": "M: optimizer steps per prox step (egpo: 1 is the paper's extragradient step)."}
    )
    samples_per_prompt: int = field(
        default=2,
        metadata={"help": "Pairs per prompt in every inner step; sppo: K samples of pi_k per prompt (>= 2), all "
                          "K(K-1)/2 pairs queried."},
    )
    sample_labels: bool = field(
        default=False, metadata={"help": "Train on 0/1 labels drawn from P(y > y') instead of the probability."}
    )
    win_rate_prompts: int = field(
        default=16, metadata={"help": "Prompts per round for the win rates of pi_{k+1} vs pi_ref and pi_k (0: none)."}
    )
    win_rate_samples: int = field(default=1, metadata={"help": "Samples per win-rate prompt (2 queries each)."})
    anneal_prox_steps: bool = field(
        default=False,
        metadata={"help": "Cosine-decay the learning rate within every prox step, restarting at the next one "
                          "(replaces lr_scheduler_type): a prox step is a stochastic optimisation, and a constant "
                          "step size leaves it a noise floor."},
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if self.method == "nash_md" and self.eta * self.beta > 1:
            raise ValueError(f"nash_md needs eta * beta <= 1 for its mixture, got {self.eta * self.beta:.3g}")
        for name in ("inner_steps", "samples_per_prompt", "win_rate_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.method == "sppo" and self.samples_per_prompt < 2:
            raise ValueError(f"sppo compares samples of pi_k with each other: samples_per_prompt must be >= 2, "
                             f"got {self.samples_per_prompt}")
        if self.win_rate_prompts < 0:
            raise ValueError(f"win_rate_prompts must be >= 0, got {self.win_rate_prompts}")
        if METHODS[self.method].loss != "policy_gradient" and (self.temperature != 1.0 or self.top_p != 1.0):
            # Their regression losses take no importance weights: tempered samples would move them to a tempered
            # fixed point in silence. (The policy-gradient methods correct with importance_correction.)
            raise ValueError(f"method {self.method}: its {METHODS[self.method].loss} loss is not corrected for a "
                             f"sampler other than pi: set temperature 1 and top_p 1 (got temperature "
                             f"{self.temperature}, top_p {self.top_p})")
        super().__post_init__()

    on_policy = True  # the estimators need samples of pi_theta (or pi_k) itself

    def equal_work_counts(self) -> dict[str, int]:
        return {**super().equal_work_counts(), "win_rate_prompts": self.win_rate_prompts}

    @property
    def nash_method(self) -> NashMethod:
        return METHODS[self.method]

    @property
    def prox_steps(self) -> tuple[str, ...]:
        """Names of the prox steps of one iteration."""
        return self.nash_method.phases

    @property
    def anchor_coef(self) -> float:
        """c, the weight of KL(pi_theta||pi_k) in the policy-gradient prox loss (module docstring)."""
        return 1 / self.eta - (self.beta if self.method == "nash_md" else 0.0)

    @property
    def ref_weight(self) -> float:
        """w = eta beta / (1 + eta beta): pi_ref's share of the merged anchor ref^w pi_k^(1-w) (sppo, nash_prox)."""
        return self.eta * self.beta / (1 + self.eta * self.beta)


NashMPConfig = NLHFConfig  # the name before the trainer ran every NLHF method
