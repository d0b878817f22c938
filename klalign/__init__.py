"""klalign: KL-regularised alignment of language models on the Hugging Face stack.

Public API, by topic (each name is documented in the README):
"""

from klalign.best_of_n import BestOfNSampler, distillation_dataset, preference_dataset
from klalign.checks import ConfigError, run_recipe
from klalign.config import DataArguments, parse_config, resume_checkpoint
from klalign.data import (
    DataError,
    load_preference_dataset,
    load_prompt_dataset,
    validate_preference_dataset,
    validate_prompt_dataset,
)
from klalign.generation import (
    Completion,
    GenerationArguments,
    generate_responses,
    sample_completions,
    sampling_config,
    stop_token_ids,
)
from klalign.logprobs import kl_k1, kl_k2, kl_k3, sequence_logprobs, token_logprobs
from klalign.losses import (
    PREFERENCE_LOSSES,
    dpo_sigmoid_loss,
    ipo_loss,
    length_normalized_sigmoid_loss,
    rso_hinge_loss,
)
from klalign.models import (
    ModelArguments,
    convert_gguf,
    load_causal_lm,
    load_policy_and_reference,
    load_reward_model,
    load_tokenizer,
    lora_config,
    resolve_model_path,
)
from klalign.distributed import check_equal_work, place_frozen, prepare_frozen, whole_model_loading
from klalign.enhancers import ENHANCERS
from klalign.evaluation import EvaluationArguments, EvaluationError, EvaluationReport, evaluate_checkpoints
from klalign.feedback import FeedbackStore
from klalign.online import OnlineConfig, OnlineTrainer
from klalign.closed_actions import ClosedActionLlamaConfig, ClosedActionLlamaForCausalLM
from klalign.nash_losses import NASH_LOSSES, prox_policy_gradient_loss, self_play_ipo_loss, sppo_loss
from klalign.oracles import (
    BradleyTerryPreference,
    CallableReward,
    LMJudgePreference,
    OracleArguments,
    OracleError,
    PreferenceOracle,
    RewardModelOracle,
    RewardOracle,
    build_oracle,
    build_reward_oracle,
)
from klalign.geometric_mixture import sample_geometric_mixture
from klalign.importance import truncated_weights
from klalign.manifest import RunMismatchError
from klalign.preference_models import (
    CyclicTextPreference,
    PairwisePreferenceModel,
    load_preference_model,
    text_features,
)
from klalign.reference import Reference
from klalign.resume import ResumeError
from klalign.reporting import write_summary
from klalign.reward_learning import (
    EnsembleReward,
    FeatureMap,
    HiddenStateFeatures,
    LinearReward,
    RewardLearner,
    SentenceEmbeddingFeatures,
    TabularFeatures,
    build_feature_map,
    build_reward_learner,
)
from klalign.rewards import get_reward_function, vader_sentiment
from klalign.sampling import RejectionSamplingArguments, build_rso_dataset, rejection_sample
from klalign.snapshots import reset, swapped, take_snapshot
from klalign.theory import (
    best_of_n_distribution,
    best_of_n_kl_bound,
    best_of_n_kl_estimate,
    best_of_n_win_rate,
    egpo,
    exploitability,
    kl,
    mirror_descent,
    nash_md,
    nash_mirror_prox,
    nash_prox,
    online_ipo,
    regularized_nash,
    regularized_objective,
    rso_acceptance_rate,
    simulate_kl_ucb,
    sppo,
    tilt,
    tilt_for_kl_budget,
)
from klalign.trainers.dpo import DPOConfig, DPOTrainer
from klalign.vllm_engine import VLLMEngine
from klalign.trainers.iterative import IterativeDPOConfig, IterativeDPOTrainer
from klalign.trainers.nash_methods import METHODS as NASH_METHODS
from klalign.trainers.nash_mp import NashMPConfig, NashMPTrainer
from klalign.trainers.optimistic import OptimisticKLConfig, OptimisticKLTrainer
from klalign.testbed import SingleTokenBandit, TestbedPreference, TestbedReward, off_action_mass, read_policy

__version__ = "0.1.0"

__all__ = [
    "best_of_n_distribution",
    "best_of_n_kl_bound",
    "best_of_n_kl_estimate",
    "best_of_n_win_rate",
    "BestOfNSampler",
    "BradleyTerryPreference",
    "build_feature_map",
    "build_oracle",
    "build_reward_learner",
    "build_reward_oracle",
    "build_rso_dataset",
    "CallableReward",
    "check_equal_work",
    "ClosedActionLlamaConfig",
    "ClosedActionLlamaForCausalLM",
    "Completion",
    "ConfigError",
    "convert_gguf",
    "CyclicTextPreference",
    "DataArguments",
    "DataError",
    "distillation_dataset",
    "dpo_sigmoid_loss",
    "DPOConfig",
    "DPOTrainer",
    "egpo",
    "ENHANCERS",
    "EnsembleReward",
    "evaluate_checkpoints",
    "EvaluationArguments",
    "EvaluationError",
    "EvaluationReport",
    "exploitability",
    "FeatureMap",
    "FeedbackStore",
    "generate_responses",
    "GenerationArguments",
    "get_reward_function",
    "HiddenStateFeatures",
    "ipo_loss",
    "IterativeDPOConfig",
    "IterativeDPOTrainer",
    "kl",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "length_normalized_sigmoid_loss",
    "LinearReward",
    "LMJudgePreference",
    "load_causal_lm",
    "load_policy_and_reference",
    "load_preference_dataset",
    "load_preference_model",
    "load_prompt_dataset",
    "load_reward_model",
    "load_tokenizer",
    "lora_config",
    "mirror_descent",
    "ModelArguments",
    "NASH_LOSSES",
    "nash_md",
    "NASH_METHODS",
    "nash_mirror_prox",
    "nash_prox",
    "NashMPConfig",
    "NashMPTrainer",
    "off_action_mass",
    "online_ipo",
    "OnlineConfig",
    "OnlineTrainer",
    "OptimisticKLConfig",
    "OptimisticKLTrainer",
    "OracleArguments",
    "OracleError",
    "PairwisePreferenceModel",
    "parse_config",
    "place_frozen",
    "preference_dataset",
    "PREFERENCE_LOSSES",
    "PreferenceOracle",
    "prepare_frozen",
    "prox_policy_gradient_loss",
    "read_policy",
    "Reference",
    "regularized_nash",
    "regularized_objective",
    "rejection_sample",
    "RejectionSamplingArguments",
    "reset",
    "resolve_model_path",
    "resume_checkpoint",
    "ResumeError",
    "RewardLearner",
    "RewardModelOracle",
    "RewardOracle",
    "rso_acceptance_rate",
    "rso_hinge_loss",
    "run_recipe",
    "RunMismatchError",
    "sample_completions",
    "sample_geometric_mixture",
    "sampling_config",
    "self_play_ipo_loss",
    "SentenceEmbeddingFeatures",
    "sequence_logprobs",
    "simulate_kl_ucb",
    "SingleTokenBandit",
    "sppo",
    "sppo_loss",
    "stop_token_ids",
    "swapped",
    "TabularFeatures",
    "take_snapshot",
    "TestbedPreference",
    "TestbedReward",
    "text_features",
    "tilt",
    "tilt_for_kl_budget",
    "token_logprobs",
    "truncated_weights",
    "vader_sentiment",
    "validate_preference_dataset",
    "validate_prompt_dataset",
    "VLLMEngine",
    "whole_model_loading",
    "write_summary",
]
