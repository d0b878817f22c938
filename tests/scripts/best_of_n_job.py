"""Best-of-N with a reward model, as a user's own script runs it (tests/test_distributed.py launches it
with one process and under `accelerate launch` with two: the output files must be the same).

    accelerate launch tests/scripts/best_of_n_job.py OUTPUT.jsonl
"""

import sys

from klalign import (
    BestOfNSampler,
    GenerationArguments,
    build_reward_oracle,
    load_causal_lm,
    load_prompt_dataset,
    load_tokenizer,
    place_frozen,
    whole_model_loading,
)
from klalign.models.placement import process_state

if __name__ == "__main__":
    process_state()
    with whole_model_loading():
        policy = load_causal_lm("tiny:policy", trainable=False)
        oracle = build_reward_oracle(reward_model_path="tiny:reward").prepare()
    prompts = load_prompt_dataset("configs/data/tiny_prompts.jsonl")["prompt"][:10]
    sampler = BestOfNSampler(place_frozen(policy), load_tokenizer("tiny:policy"), oracle, n=4,
                             generation=GenerationArguments(max_new_tokens=8, generation_batch_size=8), progress=False)
    sampler.sample(prompts, output_path=sys.argv[1])
