"""Preference oracles that are not a reward in disguise: a pairwise preference model, and a cyclic text judge.

A Bradley-Terry oracle `P(A > B) = sigmoid(r(A) - r(B))` is transitive: its Nash equilibrium is a
point mass on the best response, and Nash learning from human feedback (ALGORITHMS.md section 3)
then has nothing to add to reward maximisation. Both oracles here can be intransitive.

- `PairwisePreferenceModel`: a sequence-classification model that reads (prompt, response A,
  response B) in one text and outputs P(A > B), the PairRM-style preference model Munos et al. 2023
  and Tiapkin et al. 2025 train against. One output: P = sigmoid(logit); two outputs: P = softmax[0].
  A model read in one order has a position bias, so the oracle asks both orders and returns
  (p(A, B) + 1 - p(B, A)) / 2: P(A > B) + P(B > A) = 1 exactly and P(A > A) = 1/2. Loaded from a
  local folder (`build_oracle(OracleArguments(preference_model_path=...))`, `tiny:preference` for tests).
- `CyclicTextPreference`: a fixed, hand-made judge over three features of the response text (VADER
  sentiment, length, lexical variety), each in [-1, 1]:
      P(A > B) = sigmoid((w (r(A) - r(B)) + phi(A)^T M phi(B)) / T),   M = [[0, 1, -1], [-1, 0, 1], [1, -1, 0]],
  with r the sentiment. M is skew-symmetric, so P(A > B) + P(B > A) = 1, and it is a rotation: positive
  beats long, long beats varied, varied beats positive, the way rock beats scissors. On real text
  it has cycles A > B > C > A (tests show one), so a policy trained against it should end at a mixed
  equilibrium, which a Bradley-Terry reward cannot express. It is an artificial judge built to be
  intransitive, not a model of human preferences: what it shows is that the Nash methods handle
  intransitivity, not that any human judge is intransitive in this way.
"""

from __future__ import annotations

import math

import torch

from klalign.data.prompts import prompt_text
from klalign.models.placement import place_frozen
from klalign.oracles.base import PreferenceOracle

PAIR_TEMPLATE = "{prompt}\n\n### Response A:\n{a}\n\n### Response B:\n{b}"


class PairwisePreferenceModel(PreferenceOracle):
    """P(A > B) from a sequence classifier over `template.format(prompt, a, b)`, symmetrised over both orders."""

    def __init__(self, model, tokenizer, template: str = PAIR_TEMPLATE, batch_size: int = 16,
                 max_length: int | None = None, name: str = "preference_model"):
        num_labels = model.config.num_labels
        if num_labels not in (1, 2):
            raise ValueError(f"preference model {name!r} has num_labels={num_labels}; expected 1 (logit of A > B) "
                             "or 2 (A wins, B wins)")
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size, self.max_length, self.name = batch_size, max_length, name
        self._fingerprint = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # of the weights as loaded (before the model is prepared)
            from klalign.runs.manifest import digest, model_fingerprint

            self._fingerprint = (f"{self.name}:{model_fingerprint(self.model)}:template={digest(self.template)}"
                                 f":max_length={self.max_length}")
        return self._fingerprint

    def prepare(self, accelerator=None, device=None):
        self.model = place_frozen(self.model, accelerator, device)
        return self

    @torch.no_grad()
    def first_wins(self, prompts, firsts, seconds) -> torch.Tensor:
        """P(the response shown first is better), one order only. (N,) float64"""
        texts = [self.template.format(prompt=prompt_text(p), a=a, b=b) for p, a, b in zip(prompts, firsts, seconds)]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length).to(device)
            logits = self.model(**enc).logits.double()  # (b, 1) or (b, 2)
            p = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, -1)[:, 0]
            out.append(p.cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def _preference(self, prompts, responses_a, responses_b):
        return (self.first_wins(prompts, responses_a, responses_b)
                + 1 - self.first_wins(prompts, responses_b, responses_a)) / 2


def load_preference_model(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                          cache_dir: str | None = None):
    """A frozen pairwise preference model (sequence classification, 1 or 2 outputs) and its tokenizer,
    from a local folder, a .gguf file, package:<pkg>/<file> or `tiny:preference` (never a hub id)."""
    from transformers import AutoModelForSequenceClassification

    from klalign.models.loading import DTYPES, load_tokenizer, resolve_model_path

    folder = resolve_model_path(path, cache_dir)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=DTYPES[dtype],
                                                               trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"  # the score is read at the last token; left padding keeps it last
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval().requires_grad_(False), tokenizer


# ----------------------------------------------------------------------------- the cyclic judge

CYCLE = torch.tensor([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]], dtype=torch.float64)  # skew: M = -M^T
FEATURES = ("sentiment", "length", "variety")


def text_features(responses: list[str], length_scale: float = 12.0) -> torch.Tensor:
    """Each response's (sentiment, length, variety) in [-1, 1]. (N, 3) float64

    sentiment: VADER's compound score; length: tanh((words - s) / s) with s = `length_scale` words;
    variety: 2 * (distinct words / words) - 1 (1: no word repeated; -1 for an empty response)."""
    from klalign.oracles.reward_functions import vader_sentiment

    sentiment = vader_sentiment([""] * len(responses), responses)
    rows = []
    for text, s in zip(responses, sentiment):
        words = text.lower().split()
        length = math.tanh((len(words) - length_scale) / length_scale)
        variety = 2 * len(set(words)) / len(words) - 1 if words else -1.0
        rows.append([s, length, variety])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)


class CyclicTextPreference(PreferenceOracle):
    """The intransitive judge of the module docstring: sigmoid((w (r_A - r_B) + phi_A^T M phi_B) / T)."""

    def __init__(self, temperature: float = 0.25, transitive_weight: float = 0.0, length_scale: float = 12.0):
        if temperature <= 0 or length_scale <= 0:
            raise ValueError(f"temperature and length_scale must be > 0, got {temperature}, {length_scale}")
        self.temperature, self.transitive_weight, self.length_scale = temperature, transitive_weight, length_scale
        self.name = "cyclic_text"

    def fingerprint(self) -> str:
        return (f"{self.name}:temperature={self.temperature}:transitive_weight={self.transitive_weight}"
                f":length_scale={self.length_scale}")

    def margin(self, responses_a: list[str], responses_b: list[str]) -> torch.Tensor:
        """w (r_A - r_B) + phi_A^T M phi_B, antisymmetric in (A, B). (N,)"""
        fa, fb = text_features(responses_a, self.length_scale), text_features(responses_b, self.length_scale)
        cyclic = torch.einsum("ni,ij,nj->n", fa, CYCLE, fb)
        return self.transitive_weight * (fa[:, 0] - fb[:, 0]) + cyclic

    def _preference(self, prompts, responses_a, responses_b):
        return torch.sigmoid(self.margin(responses_a, responses_b) / self.temperature)


PREFERENCE_FUNCTIONS = {"cyclic_text": CyclicTextPreference}
