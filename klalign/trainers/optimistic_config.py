"""`OptimisticKLConfig`: the settings of optimistic KL-regularised RLHF (`OptimisticKLTrainer`): the reward learner,
its features and bonus, where the KL enters, and what reward the policy-gradient step takes (plus `OnlineConfig`
and TrainingArguments)."""

from __future__ import annotations

from dataclasses import dataclass, field

from klalign.trainers.features import FEATURE_MAPS
from klalign.trainers.online_config import OnlineConfig
from klalign.trainers.reward_learning import REWARD_LEARNERS

KL_PENALTIES = ("k1_in_reward", "k3_in_loss")
UPDATE_REWARDS = ("fitted", "observed")


@dataclass
class OptimisticKLConfig(OnlineConfig):
    """Optimistic KL-regularised RLHF settings (plus OnlineConfig and TrainingArguments).

    `per_device_train_batch_size` counts sequences and must be a multiple of `samples_per_prompt`:
    a prompt's k samples share one mini-batch (the leave-one-out baseline needs them together).
    """

    samples_per_prompt: int = field(default=4, metadata={"help": "k: samples per prompt each round (>= 2, RLOO)."})
    reward_learner: str = field(default="linear", metadata={"help": f"Reward learner: {list(REWARD_LEARNERS)}."})
    feature_map: str = field(default="minilm", metadata={"help": f"Frozen features phi(x, y): {list(FEATURE_MAPS)}."})
    gamma: float = field(default=1.0, metadata={"help": "Bonus scale; 0 gives the greedy learner."})
    ridge: float = field(default=1.0, metadata={"help": "lam of Sigma = lam I + sum phi phi^T (and the L2 penalty)."})
    r_max: float | None = field(default=1.0, metadata={"help": "Clip r_hat + bonus at r_max (null: no clip)."})
    preference_temperature: float | None = field(
        default=None,
        metadata={"help": "T of the link P(a > b) = sigmoid((r_a - r_b) / T) the preference learner fits, so that "
                          "r_hat is in reward units, those of r_max and beta; default: the oracle's own temperature "
                          "when it is a BradleyTerryPreference, else 1."},
    )
    ensemble_size: int = field(default=8, metadata={"help": "Heads of the 'ensemble' reward learner."})
    prior_scale: float = field(default=1.0, metadata={"help": "Ensemble prior std, in units of 1/sqrt(ridge)."})
    kl_penalty: str = field(default="k1_in_reward", metadata={"help": f"Where the KL enters: {list(KL_PENALTIES)}."})
    update_reward: str = field(
        default="fitted",
        metadata={"help": "The reward of the round's own samples in the policy-gradient step, before the bonus: "
                          "'fitted', the learner's r_hat (paper 000, Algorithm 1); 'observed', the oracle's reward of "
                          "each sample (reward oracles only), so the step follows the oracle wherever the learner's "
                          "features cannot express it. The bonus comes from the learner either way."},
    )
    epochs_per_round: int = field(default=1, metadata={"help": "Passes over the round's samples."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO clip of pi / pi_old on off-policy steps."})

    on_policy = True  # RLOO's gradient and the k1/k3 estimates are on samples of pi itself

    def __post_init__(self):
        choices = {"reward_learner": REWARD_LEARNERS, "kl_penalty": KL_PENALTIES, "feature_map": FEATURE_MAPS,
                   "update_reward": UPDATE_REWARDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (leave-one-out baseline), got {self.samples_per_prompt}")
        if self.per_device_train_batch_size % self.samples_per_prompt:
            raise ValueError(f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple "
                             f"of samples_per_prompt ({self.samples_per_prompt})")
        if self.gamma < 0 or self.ridge <= 0 or self.clip_range <= 0:
            raise ValueError(f"need gamma >= 0, ridge > 0, clip_range > 0; "
                             f"got {self.gamma}, {self.ridge}, {self.clip_range}")
        if self.preference_temperature is not None and self.preference_temperature <= 0:
            raise ValueError(f"preference_temperature must be > 0, got {self.preference_temperature}")
        if self.ensemble_size < 2 or self.epochs_per_round < 1:
            raise ValueError(f"need ensemble_size >= 2, epochs_per_round >= 1; got {self.ensemble_size}, "
                             f"{self.epochs_per_round}")
        super().__post_init__()
