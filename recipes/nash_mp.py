"""Nash learning from human feedback: Nash Mirror Prox (Tiapkin et al. 2025), its baselines mirror descent and
Nash-MD (Munos et al. 2023), and the self-play methods online IPO (Calandriello et al. 2024), EGPO (Zhou et al.
2025), SPPO (Wu et al. 2024) and Nash Prox (the later version of Tiapkin et al.), selected by `method`.

    accelerate launch recipes/nash_mp.py --config configs/tiny/nash_mp.yaml
    accelerate launch recipes/nash_mp.py --config configs/tiny/nash_mp.yaml --method nash_md --eta 1.0
    accelerate launch recipes/nash_mp.py --config configs/tiny/nash_mp.yaml --method online_ipo
    accelerate launch recipes/nash_mp.py --config configs/tiny/nash_cyclic.yaml        # an intransitive judge

Each round is one iteration k. Nash-MP: M policy-gradient steps on the prox loss against pi_k give
pi_{k+1/2}; M more from theta_k against pi_{k+1/2} give pi_{k+1} (the other methods: klalign.trainers.nash_methods).
Every sampled pair and the preference oracle's answer is stored as it comes. Interrupted? Run the same command
with `--resume_from_checkpoint true`: the last whole iteration is the start, stored pairs are reused.
"""

from klalign import (
    DataArguments,
    ModelArguments,
    NLHFConfig,
    NLHFTrainer,
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

CONFIG_TYPES = (ModelArguments, DataArguments, OracleArguments, NLHFConfig)  # the dataclasses the YAML keys map onto
ROUND_METRICS = ("win_rate/vs_reference", "win_rate/vs_previous", "kl_k3", "loss", "preference_queries", "eval_queries")


def main():
    model_args, data_args, oracle_args, training_args = parse_config(*CONFIG_TYPES)

    # 1. Prompts first (bad input fails before any model is loaded), then the oracle and the models.
    load_prompt_dataset(data_args.dataset_path)
    if data_args.eval_dataset_path is not None:
        load_prompt_dataset(data_args.eval_dataset_path)
    load = dict(cache_dir=model_args.cache_dir, trust_remote_code=training_args.trust_remote_code)
    tokenizer = load_tokenizer(model_args.model_name_or_path, **load)
    prompts = load_prompt_dataset(data_args.dataset_path, tokenizer=tokenizer, max_length=None)
    win_rate_prompts = None
    if data_args.eval_dataset_path is not None:
        win_rate_prompts = load_prompt_dataset(data_args.eval_dataset_path, tokenizer=tokenizer, max_length=None)
    oracle = build_oracle(oracle_args, dtype=model_args.dtype, **load)
    policy, reference = load_policy_and_reference(model_args, training_args.trust_remote_code)

    # 2. Iterations of (sample against the opponent, ask, store, policy-gradient step) x M, twice.
    trainer = NLHFTrainer(
        model=policy,
        ref_model=reference,
        args=training_args,
        train_dataset=prompts,
        processing_class=tokenizer,
        oracle=oracle,
        peft_config=lora_config(model_args),
        eval_dataset=win_rate_prompts,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    # 3. Per iteration: win rates of pi_{k+1} against pi_ref and pi_k, KL to pi_ref, queries used.
    if trainer.accelerator.is_main_process:
        metrics = {}
        for h in trainer.state.log_history:
            for key in ROUND_METRICS:
                if "round" in h and key in h:
                    metrics[f"round {h['round']} {key}"] = h[key]
        method, eta, M = training_args.method, training_args.eta, training_args.inner_steps
        write_summary(
            training_args.output_dir,
            f"{method} (beta={training_args.beta}, eta={eta}, M={M}, oracle={oracle.name})",
            metrics,
            {"model": training_args.output_dir, "feedback": str(trainer.store.directory)},
        )

    # No wait for the other processes and no end_training() here: run_recipe does both once this function's
    # trainer is gone (ending the group while the trainer's DDP model still held it once hung a process).


if __name__ == "__main__":
    run_recipe(main)
