"""RSO: statistical rejection sampling from the reference, then hinge (or sigmoid) preference training.

    accelerate launch recipes/rso.py --config configs/tiny/rso.yaml
    accelerate launch recipes/rso.py --config configs/tiny/rso.yaml --sampling_beta 0.25 --num_candidates 32

Liu et al. 2024 (ALGORITHMS.md section 2): candidates from pi_ref are kept with probability
exp((r - r_max) / beta), so the kept ones follow pi_ref * exp(r / beta); pairs of kept responses are
labelled by the reward and written to disk; then the policy is trained on them with klalign's
DPOTrainer (loss_type hinge is RSO's; sigmoid is its sigmoid-norm).
"""

from pathlib import Path

from klalign import (
    DPOConfig,
    DPOTrainer,
    GenerationArguments,
    ModelArguments,
    RejectionSamplingArguments,
    build_rso_dataset,
    load_causal_lm,
    load_policy_and_reference,
    load_preference_dataset,
    load_prompt_dataset,
    load_tokenizer,
    lora_config,
    parse_config,
    place_frozen,
    resume_checkpoint,
    run_recipe,
    whole_model_loading,
    write_summary,
)
from klalign.oracles.build import build_reward_oracle

CONFIG_TYPES = (ModelArguments, RejectionSamplingArguments, GenerationArguments, DPOConfig)  # the dataclasses the YAML keys map onto


def main():
    model_args, rso_args, generation_args, training_args = parse_config(*CONFIG_TYPES)
    pairs_path = Path(rso_args.rso_dataset_path or Path(training_args.output_dir) / "rso_pairs.jsonl")

    # 1. Prompts first: bad input fails before any model is loaded.
    prompts = load_prompt_dataset(rso_args.prompt_dataset_path)["prompt"]
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.trust_remote_code, model_args.cache_dir)

    # 2. Rejection sampling from the reference (the initial policy), spread over the processes; each
    # prompt's pairs are appended as they come. Sampler and reward model are whole on every process
    # (they only run inference here), whatever the launch mode does to models it trains.
    load = dict(dtype=model_args.dtype, trust_remote_code=training_args.trust_remote_code, cache_dir=model_args.cache_dir)
    with whole_model_loading():
        oracle = build_reward_oracle(rso_args.reward_fn, rso_args.reward_model_path, **load).prepare()
        sampler = load_causal_lm(
            model_args.ref_model_name_or_path or model_args.model_name_or_path,
            adapter_path=None if model_args.ref_model_name_or_path else model_args.adapter_path,
            trainable=False,
            **load,
        )
    stats = build_rso_dataset(place_frozen(sampler), tokenizer, prompts, oracle, pairs_path, rso_args, generation_args)
    del sampler, oracle

    # 3. Preference training on the pairs.
    train_dataset = load_preference_dataset(pairs_path, tokenizer=tokenizer, max_length=training_args.max_length)
    policy, reference = load_policy_and_reference(
        model_args, training_args.trust_remote_code, training_args.precompute_ref_log_probs
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args.resume_from_checkpoint))
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        metrics = {**stats, "pairs_in_file": len(train_dataset),
                   "train_loss": trainer.state.log_history[-1].get("train_loss")}
        write_summary(
            training_args.output_dir,
            f"RSO ({training_args.loss_type}, sampling_beta={rso_args.sampling_beta})",
            metrics,
            {"model": training_args.output_dir, "pairs_file": str(pairs_path)},
        )

    # No wait for the other processes and no end_training() here: run_recipe does both once this function's
    # trainer is gone (ending the group while the trainer's DDP model still held it once hung a process).


if __name__ == "__main__":
    run_recipe(main)
