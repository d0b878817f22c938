"""A sequence-classification reward model as a reward oracle."""

from __future__ import annotations

import torch

from klalign.data.prompts import with_response
from klalign.models.placement import place_frozen
from klalign.oracles.base import RewardOracle


class RewardModelOracle(RewardOracle):
    """An `AutoModelForSequenceClassification` with one output scoring prompt + response text.

    Conversational prompts (lists of messages) are rendered with the reward tokenizer's chat
    template with the response as the assistant turn; string prompts are concatenated.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None, name: str = "reward_model"):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.name = batch_size, max_length, name
        self._fingerprint = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # of the weights as loaded (computed before the model is prepared)
            from klalign.runs.manifest import model_fingerprint

            self._fingerprint = f"{self.name}:{model_fingerprint(self.model)}:max_length={self.max_length}"
        return self._fingerprint

    def prepare(self, accelerator=None, device=None):
        self.model = place_frozen(self.model, accelerator, device)
        return self

    @torch.no_grad()
    def _score(self, prompts, responses):
        texts = [with_response(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
            ).to(device)
            scores.append(self.model(**enc).logits[:, 0].float().cpu())  # (b,)
        return torch.cat(scores)
