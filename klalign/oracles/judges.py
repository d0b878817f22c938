"""A local causal LM as a pairwise judge (a preference oracle)."""

from __future__ import annotations

import torch

from klalign.data.prompts import prompt_text
from klalign.models.placement import place_frozen
from klalign.ops.batching import left_padded
from klalign.oracles.base import PreferenceOracle

JUDGE_TEMPLATE = (
    "Which response answers the prompt better?\n\nPrompt: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}\n\n"
    "Answer with A or B. The better response is"
)



class LMJudgePreference(PreferenceOracle):
    """A local causal LM as a pairwise judge.

    P(A > B) is read from the judge's next-token log-probs of " A" and " B" (or "A", "B") after a comparison
    prompt, normalised over the two; the pair is judged in both orders and the two estimates
    averaged, `(p(A | A first) + 1 - p(A | B first)) / 2`, which removes position bias. With a chat
    tokenizer the question is the user turn and the answer starts the assistant turn.
    """

    def __init__(self, model, tokenizer, template: str = JUDGE_TEMPLATE, batch_size: int = 8, name: str = "lm_judge"):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size, self.name = batch_size, name
        self.choice_ids = [self._single_token(letter) for letter in "AB"]
        self._fingerprint = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            from klalign.runs.manifest import digest, model_fingerprint

            self._fingerprint = f"{self.name}:{model_fingerprint(self.model)}:template={digest(self.template)}"
        return self._fingerprint

    def prepare(self, accelerator=None, device=None):
        self.model = place_frozen(self.model, accelerator, device)
        return self

    def _single_token(self, letter: str) -> int:
        """The answer token: " A" where the tokenizer has it as one token (most BPEs), else "A"."""
        for text in (f" {letter}", letter):
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) == 1:
                return ids[0]
        raise ValueError(f"judge {self.name!r}: neither ' {letter}' nor '{letter}' is one token for this tokenizer")

    def _query(self, prompt, a: str, b: str) -> list[int]:
        question = self.template.format(prompt=prompt_text(prompt), a=a, b=b)
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            ) + "The better response is"
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(question).input_ids

    @torch.no_grad()
    def _first_wins(self, prompts, firsts, seconds) -> torch.Tensor:
        """P(the first-shown response is better) for each example. (N,)"""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(prompts), self.batch_size):
            rows = [self._query(p, a, b) for p, a, b in zip(*(x[start : start + self.batch_size]
                                                              for x in (prompts, firsts, seconds)))]
            enc = left_padded(rows, self.tokenizer.pad_token_id, device)
            logits = self.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float()  # (b, V)
            out.append(torch.softmax(logits[:, self.choice_ids], dim=-1)[:, 0].cpu())  # (b,)
        return torch.cat(out)

    def _preference(self, prompts, responses_a, responses_b):
        a_first = self._first_wins(prompts, responses_a, responses_b)
        b_first = self._first_wins(prompts, responses_b, responses_a)
        return (a_first + 1 - b_first) / 2
