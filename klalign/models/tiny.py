"""Tiny models built from a config, with no hub access: for tests, the quickstart and CPU demos.

A byte-level BPE tokenizer is trained in-process on an embedded corpus (milliseconds), then a
2-layer Llama causal LM and a Llama sequence-classification reward model are built from config.
Everything round-trips through `save_pretrained` / `from_pretrained` like any checkpoint.

A model path `tiny:policy`, `tiny:reward` or `tiny:preference` in a config names these; `klalign.models.loading` builds the
folder once under the cache and loads it from there.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Renders `<|role|>content<|eos|>` per message; the generation prompt is `<|assistant|>`, so a
# prompt rendered alone is a prefix of prompt + completion (what TRL's tokenisation assumes).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Phrase bank for the embedded corpus and the positivity demo data (kept small and plain).
SUBJECTS = ["the weather", "my day", "the movie", "this book", "the trip", "our team", "the food", "the city"]
POSITIVE = ["great", "wonderful", "lovely", "happy", "excellent", "fantastic", "nice", "good", "amazing", "bright"]
NEGATIVE = ["terrible", "awful", "sad", "bad", "horrible", "boring", "dull", "poor", "ugly", "gloomy"]
NEUTRAL = ["fine", "ordinary", "long", "new", "quiet", "busy", "plain", "short"]
QUESTIONS = ["How was {s}?", "What do you think of {s}?", "Tell me about {s}.", "Describe {s}.", "Any news on {s}?"]


def _corpus() -> list[str]:
    """A few hundred sentences covering every word the demo data uses."""
    rng = random.Random(0)
    words = POSITIVE + NEGATIVE + NEUTRAL
    lines = [q.format(s=s) for q in QUESTIONS for s in SUBJECTS]
    for _ in range(400):
        s, w1, w2 = rng.choice(SUBJECTS), rng.choice(words), rng.choice(words)
        lines.append(f"I think {s} was {w1} and {w2}. It is {w1}, really {w2}!")
    return lines


def build_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer in-process; pad on the left (TRL's convention)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [PAD, BOS, EOS, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus or _corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_causal_lm(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama (~100k parameters at the defaults)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, hidden_size, num_layers))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_reward_model(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> LlamaForSequenceClassification:
    """A randomly initialised tiny Llama with a scalar head (num_labels=1), scored at the last token."""
    torch.manual_seed(seed)
    config = _llama_config(tokenizer, hidden_size, num_layers)
    config.num_labels = 1
    return LlamaForSequenceClassification(config)


def build_preference_model(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, seed: int = 1
) -> LlamaForSequenceClassification:
    """A randomly initialised tiny pairwise preference model: one output, the logit of P(A > B) for a text
    holding the prompt and both responses (`klalign.oracles.preference_models.PairwisePreferenceModel`)."""
    return build_reward_model(tokenizer, hidden_size, num_layers, seed)


def save_tiny_model(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny `kind` ("policy", "reward" or "preference") with its tokenizer and save both to `out_dir`."""
    builders = {"policy": build_causal_lm, "reward": build_reward_model, "preference": build_preference_model}
    if kind not in builders:
        raise ValueError(f"unknown tiny model {kind!r}; expected one of {sorted(builders)}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = builders[kind](tokenizer, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
