"""klalign: KL-regularised alignment of language models on the Hugging Face stack.

Every public name is importable from here (`from klalign import IterativeDPOTrainer`) and documented in the
README. Names resolve lazily (PEP 562): `import klalign` and `import klalign.theory` load no torch, TRL or
PEFT; the module that defines a name is imported the first time the name is used.

The package's layers, bottom up (imports point down, never in a circle; DESIGN.md):
    errors, theory, ops          pure math and the errors every layer raises
    config, data, models         configs and their checks; datasets and prompts; loading and placing models
    generation, oracles, runs    sampling backends; reward and preference oracles; durable run state
    trainers, inference          the Trainer subclasses; best-of-N and RSO's rejection sampler
    evaluation, testbed          `klalign evaluate`; the single-token bed and the tiny positivity task
    cli                          the `klalign` console script
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module" (defined there under the same name) or "module:name"
_EXPORTS = {
    "run_recipe": "klalign.config.checks",
    "parse_config": "klalign.config.parsing",
    "resume_checkpoint": "klalign.config.parsing",
    "DataArguments": "klalign.data.datasets",
    "load_preference_dataset": "klalign.data.datasets",
    "load_prompt_dataset": "klalign.data.datasets",
    "validate_preference_dataset": "klalign.data.datasets",
    "validate_prompt_dataset": "klalign.data.datasets",
    "ConfigError": "klalign.errors",
    "DataError": "klalign.errors",
    "DivergenceError": "klalign.errors",
    "EvaluationError": "klalign.errors",
    "OracleError": "klalign.errors",
    "ResumeError": "klalign.errors",
    "RunMismatchError": "klalign.errors",
    "evaluate_checkpoints": "klalign.evaluation.evaluate",
    "estimate_exploitability": "klalign.evaluation.exploitability",
    "exploitability_estimate": "klalign.evaluation.exploitability",
    "captured_gain": "klalign.evaluation.optimum",
    "optimum_estimate": "klalign.evaluation.optimum",
    "tilt_alignment": "klalign.evaluation.optimum",
    "EvaluationArguments": "klalign.evaluation.evaluate",
    "EvaluationReport": "klalign.evaluation.evaluate",
    "sample_geometric_mixture": "klalign.generation.geometric_mixture",
    "sampling_config": "klalign.generation.hf",
    "stop_token_ids": "klalign.generation.hf",
    "generate_responses": "klalign.generation.sample",
    "sample_completions": "klalign.generation.sample",
    "Completion": "klalign.generation.types",
    "GenerationArguments": "klalign.generation.types",
    "VLLMEngine": "klalign.generation.vllm_engine",
    "BestOfNSampler": "klalign.inference.best_of_n_sampling",
    "distillation_dataset": "klalign.inference.best_of_n_sampling",
    "preference_dataset": "klalign.inference.best_of_n_sampling",
    "build_rso_dataset": "klalign.inference.rejection_sampling",
    "rejection_sample": "klalign.inference.rejection_sampling",
    "RejectionSamplingArguments": "klalign.inference.rejection_sampling",
    "convert_gguf": "klalign.models.loading",
    "load_causal_lm": "klalign.models.loading",
    "load_policy_and_reference": "klalign.models.loading",
    "load_reward_model": "klalign.models.loading",
    "load_tokenizer": "klalign.models.loading",
    "lora_config": "klalign.models.loading",
    "ModelArguments": "klalign.models.loading",
    "resolve_model_path": "klalign.models.loading",
    "check_equal_work": "klalign.models.placement",
    "place_frozen": "klalign.models.placement",
    "prepare_frozen": "klalign.models.placement",
    "whole_model_loading": "klalign.models.placement",
    "Reference": "klalign.models.reference",
    "full_snapshot": "klalign.models.snapshots",
    "reset": "klalign.models.snapshots",
    "swapped": "klalign.models.snapshots",
    "take_snapshot": "klalign.models.snapshots",
    "truncated_weights": "klalign.ops.importance",
    "kl_k1": "klalign.ops.kl",
    "kl_k2": "klalign.ops.kl",
    "kl_k3": "klalign.ops.kl",
    "sequence_logprobs": "klalign.ops.logprobs",
    "token_logprobs": "klalign.ops.logprobs",
    "shared_prompt_token_logprobs": "klalign.ops.logprobs",
    "completion_logprobs": "klalign.ops.logprobs",
    "pack_pairs": "klalign.ops.batching",
    "NASH_LOSSES": "klalign.ops.nash_losses",
    "prox_policy_gradient_loss": "klalign.ops.nash_losses",
    "self_play_ipo_loss": "klalign.ops.nash_losses",
    "sppo_loss": "klalign.ops.nash_losses",
    "dpo_sigmoid_loss": "klalign.ops.preference_losses",
    "ipo_loss": "klalign.ops.preference_losses",
    "length_normalized_sigmoid_loss": "klalign.ops.preference_losses",
    "PREFERENCE_LOSSES": "klalign.ops.preference_losses",
    "rso_hinge_loss": "klalign.ops.preference_losses",
    "BradleyTerryPreference": "klalign.oracles.base",
    "CallableReward": "klalign.oracles.base",
    "PreferenceOracle": "klalign.oracles.base",
    "RewardOracle": "klalign.oracles.base",
    "build_oracle": "klalign.oracles.build",
    "build_reward_oracle": "klalign.oracles.build",
    "OracleArguments": "klalign.oracles.build",
    "LMJudgePreference": "klalign.oracles.judges",
    "CyclicTextPreference": "klalign.oracles.preference_models",
    "load_preference_model": "klalign.oracles.preference_models",
    "PairwisePreferenceModel": "klalign.oracles.preference_models",
    "text_features": "klalign.oracles.preference_models",
    "get_reward_function": "klalign.oracles.reward_functions",
    "vader_sentiment": "klalign.oracles.reward_functions",
    "RewardModelOracle": "klalign.oracles.reward_models",
    "FeedbackStore": "klalign.runs.feedback",
    "write_summary": "klalign.runs.reporting",
    "SingleTokenBandit": "klalign.testbed.bandit",
    "TestbedPreference": "klalign.testbed.bandit",
    "TestbedReward": "klalign.testbed.bandit",
    "ClosedActionLlamaConfig": "klalign.testbed.closed_actions",
    "ClosedActionLlamaForCausalLM": "klalign.testbed.closed_actions",
    "off_action_mass": "klalign.testbed.model",
    "read_policy": "klalign.testbed.model",
    "best_of_n_distribution": "klalign.theory",
    "best_of_n_kl_bound": "klalign.theory",
    "best_of_n_kl_estimate": "klalign.theory",
    "best_of_n_win_rate": "klalign.theory",
    "egpo": "klalign.theory",
    "exploitability": "klalign.theory",
    "kl": "klalign.theory",
    "mirror_descent": "klalign.theory",
    "nash_md": "klalign.theory",
    "nash_mirror_prox": "klalign.theory",
    "nash_prox": "klalign.theory",
    "online_ipo": "klalign.theory",
    "regularized_nash": "klalign.theory",
    "regularized_objective": "klalign.theory",
    "rso_acceptance_rate": "klalign.theory",
    "simulate_kl_ucb": "klalign.theory",
    "sppo": "klalign.theory",
    "tilt": "klalign.theory",
    "tilt_for_kl_budget": "klalign.theory",
    "DPOConfig": "klalign.trainers.dpo",
    "DPOTrainer": "klalign.trainers.dpo",
    "ENHANCERS": "klalign.trainers.enhancers",
    "IterativeDPOConfig": "klalign.trainers.iterative",
    "IterativeDPOTrainer": "klalign.trainers.iterative",
    "NashMPConfig": "klalign.trainers.nash_config",
    "NashMPTrainer": "klalign.trainers.nash",
    "NLHFConfig": "klalign.trainers.nash_config",
    "NLHFTrainer": "klalign.trainers.nash",
    "NASH_METHODS": "klalign.trainers.nash_methods:METHODS",
    "OnlineConfig": "klalign.trainers.online_config",
    "OnlineTrainer": "klalign.trainers.online",
    "OptimisticKLConfig": "klalign.trainers.optimistic_config",
    "OptimisticKLTrainer": "klalign.trainers.optimistic",
    "build_feature_map": "klalign.trainers.features",
    "build_reward_learner": "klalign.trainers.reward_learning",
    "EnsembleReward": "klalign.trainers.reward_learning",
    "FeatureMap": "klalign.trainers.features",
    "HiddenStateFeatures": "klalign.trainers.features",
    "LinearReward": "klalign.trainers.reward_learning",
    "RewardLearner": "klalign.trainers.reward_learning",
    "SentenceEmbeddingFeatures": "klalign.trainers.features",
    "TabularFeatures": "klalign.trainers.features",
}

__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'klalign' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
