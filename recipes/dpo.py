"""Offline DPO / RSO-hinge / IPO on a preference dataset (ALGORITHMS.md section 2).

    accelerate launch recipes/dpo.py --config configs/tiny/dpo.yaml
    accelerate launch recipes/dpo.py --config configs/tiny/dpo.yaml --beta 0.2 --max_steps 20

Reads top to bottom: parse the config, validate the data (before any model is loaded), load the
policy and reference, train, evaluate, save, print where everything went.
"""

from datasets import Dataset

from klalign import (
    DataArguments,
    DPOConfig,
    DPOTrainer,
    ModelArguments,
    load_policy_and_reference,
    load_preference_dataset,
    load_tokenizer,
    lora_config,
    parse_config,
    resume_checkpoint,
    run_recipe,
    write_summary,
)

CONFIG_TYPES = (ModelArguments, DataArguments, DPOConfig)  # the dataclasses the YAML keys map onto


def split_eval(train: Dataset, data_args: DataArguments, seed: int):
    """(train, eval): eval from its own file, a held-out fraction, or none."""
    if data_args.eval_dataset_path:
        return train, None  # loaded separately below
    if data_args.eval_fraction > 0:
        parts = train.train_test_split(test_size=data_args.eval_fraction, seed=seed)
        return parts["train"], parts["test"]
    return train, None


def main():
    model_args, data_args, training_args = parse_config(*CONFIG_TYPES)

    # 1. Data first: a bad file fails here, in seconds, naming the file, row and field.
    load_preference_dataset(data_args.dataset_path, identical_pairs=data_args.identical_pairs)
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.trust_remote_code, model_args.cache_dir)
    validate = dict(tokenizer=tokenizer, max_length=training_args.max_length, identical_pairs=data_args.identical_pairs)
    train_dataset = load_preference_dataset(data_args.dataset_path, **validate)
    train_dataset, eval_dataset = split_eval(train_dataset, data_args, training_args.seed)
    if data_args.eval_dataset_path:
        eval_dataset = load_preference_dataset(data_args.eval_dataset_path, **validate)

    # 2. Models: with LoRA the reference is the disabled adapter (reference is None).
    policy, reference = load_policy_and_reference(
        model_args, training_args.trust_remote_code, training_args.precompute_ref_log_probs
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )

    # 3. Train (resuming from the last checkpoint when asked), evaluate, save.
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args.resume_from_checkpoint))
    metrics = {"train_loss": trainer.state.log_history[-1].get("train_loss")}
    if eval_dataset is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if "runtime" not in k and "per_second" not in k})
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        write_summary(
            training_args.output_dir,
            f"DPO ({training_args.loss_type}, beta={training_args.beta})",
            metrics,
            {"model": training_args.output_dir, "logs": f"{training_args.output_dir}/trainer_state.json"},
        )

    # No wait for the other processes and no end_training() here: run_recipe does both once this function's
    # trainer is gone (ending the group while the trainer's DDP model still held it once hung a process).


if __name__ == "__main__":
    run_recipe(main)
