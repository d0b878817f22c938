"""Online iterative DPO / RSO with an exploring enhancer (GSHF; Xiong et al., ICML 2024).

    accelerate launch recipes/iterative_dpo.py --config configs/tiny/iterative_dpo.yaml
    accelerate launch recipes/iterative_dpo.py --config configs/tiny/iterative_dpo.yaml --num_rounds 4 --enhancer temperature

Each round: sample from the main agent and the enhancer, ask the oracle, store the feedback,
train DPO (or RSO's hinge) on the data. Interrupted? Run the same command with
`--resume_from_checkpoint true`: stored feedback is reused, the last whole round is the start.
"""

from klalign import (
    DataArguments,
    IterativeDPOConfig,
    IterativeDPOTrainer,
    ModelArguments,
    OracleArguments,
    build_oracle,
    load_policy_and_reference,
    load_prompt_dataset,
    load_tokenizer,
    lora_config,
    parse_config,
    run_recipe,
    write_summary,
)

CONFIG_TYPES = (ModelArguments, DataArguments, OracleArguments, IterativeDPOConfig)  # the dataclasses the YAML keys map onto


def main():
    model_args, data_args, oracle_args, training_args = parse_config(*CONFIG_TYPES)

    # 1. Prompts first (bad input fails before any model is loaded), then the oracle and the models.
    load_prompt_dataset(data_args.dataset_path)
    load = dict(cache_dir=model_args.cache_dir, trust_remote_code=training_args.trust_remote_code)
    tokenizer = load_tokenizer(model_args.model_name_or_path, **load)
    prompts = load_prompt_dataset(data_args.dataset_path, tokenizer=tokenizer, max_length=None)
    oracle = build_oracle(oracle_args, dtype=model_args.dtype, **load)
    policy, reference = load_policy_and_reference(model_args, training_args.trust_remote_code)

    # 2. Rounds of (sample, ask, store, train).
    trainer = IterativeDPOTrainer(
        model=policy,
        ref_model=reference,
        args=training_args,
        train_dataset=prompts,
        processing_class=tokenizer,
        oracle=oracle,
        peft_config=lora_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    # 3. The per-round numbers: the main agent's reward and its KL to the reference.
    if trainer.accelerator.is_main_process:
        rounds = [h for h in trainer.state.log_history if "round" in h]
        metrics = {}
        for h in rounds:
            for key in ("main_reward", "kl_k3", "loss", "oracle_queries"):
                if key in h:
                    metrics[f"round {h['round']} {key}"] = h[key]
        write_summary(
            training_args.output_dir,
            f"Iterative DPO ({training_args.loss_type}, enhancer={training_args.enhancer}, beta={training_args.beta})",
            metrics,
            {"model": training_args.output_dir, "feedback": str(trainer.store.directory)},
        )

    # No wait for the other processes and no end_training() here: run_recipe does both once this function's
    # trainer is gone (ending the group while the trainer's DDP model still held it once hung a process).


if __name__ == "__main__":
    run_recipe(main)
