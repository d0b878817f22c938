"""Optimistic KL-regularised online RLHF (Zhao, Ye, Xiong, Gu, Zhang 2025; ALGORITHMS.md section 1).

    accelerate launch recipes/optimistic_kl.py --config configs/tiny/optimistic_kl.yaml
    accelerate launch recipes/optimistic_kl.py --config configs/tiny/optimistic_kl.yaml --gamma 0   # the greedy learner

Each round: sample k responses per prompt from the policy, ask the oracle, store the feedback, refit
the reward learner on all of it (a linear reward on frozen features with the elliptical bonus, or an
ensemble's spread), and train the policy toward pi_ref * exp(r_tilde / beta) for the optimistic
reward r_tilde = min(r_max, r_hat + bonus) (RLOO with a KL penalty). Interrupted? Run the same
command with `--resume_from_checkpoint true`: stored feedback is reused, the last whole round is the start.
"""

from klalign import (
    ConfigError,
    DataArguments,
    ModelArguments,
    OptimisticKLConfig,
    OptimisticKLTrainer,
    OracleArguments,
    build_feature_map,
    build_oracle,
    load_causal_lm,
    load_policy_and_reference,
    load_prompt_dataset,
    load_tokenizer,
    lora_config,
    parse_config,
    run_recipe,
    write_summary,
)

CONFIG_TYPES = (ModelArguments, DataArguments, OracleArguments, OptimisticKLConfig)  # the YAML keys map onto these


def main():
    model_args, data_args, oracle_args, training_args = parse_config(*CONFIG_TYPES)

    # 1. Prompts and arguments first (bad input fails before any model is loaded), then the oracle and the models.
    load_prompt_dataset(data_args.dataset_path)
    if training_args.feature_map == "reward_model" and oracle_args.reward_model_path is None:
        raise ConfigError("feature_map: reward_model reads the oracle's reward model: set reward_model_path")
    load = dict(cache_dir=model_args.cache_dir, trust_remote_code=training_args.trust_remote_code)
    tokenizer = load_tokenizer(model_args.model_name_or_path, **load)
    prompts = load_prompt_dataset(data_args.dataset_path, tokenizer=tokenizer, max_length=None)
    oracle = build_oracle(oracle_args, dtype=model_args.dtype, **load)
    policy, reference = load_policy_and_reference(model_args, training_args.trust_remote_code)

    # 2. The frozen feature map phi(x, y) of the reward learner. With LoRA the reference is the policy
    # with its adapter off, which training changes under the features' feet: they get their own copy.
    feature_model = reference
    if training_args.feature_map == "reference" and reference is None:
        feature_model = load_causal_lm(model_args.ref_model_name_or_path or model_args.model_name_or_path,
                                       dtype=model_args.dtype, trainable=False, **load)
    feature_map = build_feature_map(training_args.feature_map, reference=feature_model, tokenizer=tokenizer,
                                    oracle=oracle, device=training_args.device)

    # 3. Rounds of (sample, ask, store, refit the reward, train toward its optimistic Gibbs policy).
    trainer = OptimisticKLTrainer(
        model=policy,
        ref_model=reference,
        args=training_args,
        train_dataset=prompts,
        processing_class=tokenizer,
        oracle=oracle,
        feature_map=feature_map,
        peft_config=lora_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    # 4. The per-round numbers: the learner's rewards and bonus, the oracle's reward, the KL to the reference.
    if trainer.accelerator.is_main_process:
        metrics = {}
        for h in trainer.state.log_history:
            if "round" not in h:
                continue
            for key in ("oracle_reward", "reward_fitted", "bonus", "reward_optimistic", "kl_k1", "kl_k3",
                        "oracle_queries"):
                if key in h:
                    metrics[f"round {h['round']} {key}"] = h[key]
        write_summary(
            training_args.output_dir,
            f"Optimistic KL-regularised RLHF ({training_args.reward_learner} reward on {training_args.feature_map} "
            f"features, gamma={training_args.gamma}, beta={training_args.beta}, {training_args.kl_penalty})",
            metrics,
            {"model": training_args.output_dir, "feedback": str(trainer.store.directory)},
        )

    # No wait for the other processes and no end_training() here: run_recipe does both once this function's
    # trainer is gone (ending the group while the trainer's DDP model still held it once hung a process).


if __name__ == "__main__":
    run_recipe(main)
