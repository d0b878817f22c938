"""klalign: KL-regularised alignment of language models on the Hugging Face stack.

Public API, by topic (each name is documented in the README):
"""

from klalign.config import DataArguments, parse_config, resume_checkpoint
from klalign.data import (
    DataError,
    load_preference_dataset,
    load_prompt_dataset,
    validate_preference_dataset,
    validate_prompt_dataset,
)
from klalign.generation import GenerationArguments, generate_responses
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
from klalign.oracles import (
    BradleyTerryPreference,
    CallableReward,
    OracleError,
    PreferenceOracle,
    RewardOracle,
)
from klalign.reporting import write_summary
from klalign.rewards import get_reward_function, vader_sentiment
from klalign.sampling import RejectionSamplingArguments, build_rso_dataset, rejection_sample
from klalign.trainers.dpo import DPOConfig, DPOTrainer

__version__ = "0.1.0"

__all__ = [
    "BradleyTerryPreference",
    "CallableReward",
    "DPOConfig",
    "DPOTrainer",
    "DataArguments",
    "DataError",
    "GenerationArguments",
    "ModelArguments",
    "OracleError",
    "PREFERENCE_LOSSES",
    "PreferenceOracle",
    "RejectionSamplingArguments",
    "RewardOracle",
    "build_rso_dataset",
    "convert_gguf",
    "dpo_sigmoid_loss",
    "generate_responses",
    "get_reward_function",
    "ipo_loss",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "length_normalized_sigmoid_loss",
    "load_causal_lm",
    "load_policy_and_reference",
    "load_preference_dataset",
    "load_prompt_dataset",
    "load_reward_model",
    "load_tokenizer",
    "lora_config",
    "parse_config",
    "rejection_sample",
    "resolve_model_path",
    "resume_checkpoint",
    "rso_hinge_loss",
    "sequence_logprobs",
    "token_logprobs",
    "validate_preference_dataset",
    "validate_prompt_dataset",
    "vader_sentiment",
    "write_summary",
]
