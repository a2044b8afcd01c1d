"""Judges that no stage trained against: program checks, and a pairwise model judge asked in both orders.

A reward model that picked a stage's training pairs is a biased referee of that stage: the policy learned to
please it. The win rates a report leads with therefore come from

- program checks (``stages.core.rewards``): per prompt, the reply that passes more of the checks that apply
  to it wins; equal counts tie;
- optionally a pairwise judge: another local causal LM (``model``), or an OpenAI-compatible chat-completions
  endpoint (``url`` + ``endpoint_model``, key from the environment variable ``api_key_env``). It sees one
  fixed rubric (``RUBRIC``), is asked twice with the replies' positions swapped, and a reply wins only when
  both orders prefer it; when the orders disagree (position bias) the prompt counts as a tie.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from stages.core.config import field
from stages.core.errors import ConfigError, LorelayError
from stages.core.rewards import PASS, Reward

Choice = Literal["A", "B"] | None  # None: the judge named neither reply

RUBRIC = (
    "You are judging two replies of an assistant to the same user message. Prefer the reply that does exactly "
    "what the message asks, correctly and completely, in the form it asks for. Penalise invented facts, content "
    "nobody asked for, and rambling. Answer with a single letter: A or B."
)


def judge_prompt(prompt: str, reply_a: str, reply_b: str, rubric: str = RUBRIC) -> list[dict[str, str]]:
    """The chat messages one pairwise comparison sends: the rubric, then the case."""
    case = f"User message:\n{prompt}\n\nReply A:\n{reply_a}\n\nReply B:\n{reply_b}\n\nWhich reply is better, A or B?"
    return [{"role": "system", "content": rubric}, {"role": "user", "content": case}]


def parse_choice(text: str) -> Choice:
    """``A`` or ``B`` from a judge's answer ("B", "b.", "Reply A"); None when it names neither or both."""
    words = {w.strip(".,:;!*()\"'").upper() for w in text.replace("\n", " ").split()}
    named = words & {"A", "B"}
    return named.pop() if len(named) == 1 else None


# ----------------------------------------------------------------------------------------------
# tallies
# ----------------------------------------------------------------------------------------------

def tally(verdicts: Sequence[int], prefix: str = "") -> dict[str, float | int]:
    """Counts and rates of +1 (win), -1 (loss) and 0 (tie) verdicts, keyed ``{prefix}wins`` etc."""
    n = max(len(verdicts), 1)
    wins, losses = sum(v > 0 for v in verdicts), sum(v < 0 for v in verdicts)
    return {f"{prefix}wins": wins, f"{prefix}losses": losses, f"{prefix}ties": len(verdicts) - wins - losses,
            f"{prefix}win_rate_vs_parent": wins / n, f"{prefix}loss_rate_vs_parent": losses / n}


def column_lists(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Per-row column dicts as the column lists a reward takes (a row without a key gets None)."""
    return {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}


def check_outcomes(checks: Sequence[Reward], prompts: Sequence, completions: Sequence[str],
                   columns: Sequence[Mapping[str, Any]]) -> list[dict[str, bool | None]]:
    """Per completion: {check name: passed (value >= PASS), or None where the check does not apply}."""
    outcomes: list[dict[str, bool | None]] = [{} for _ in completions]
    for check in checks:
        for outcome, value in zip(outcomes, check(prompts, completions, **column_lists(columns)), strict=True):
            outcome[check.name] = None if value is None else value >= PASS
    return outcomes


def check_rates(outcomes: Sequence[Mapping[str, bool | None]]) -> dict[str, float | None]:
    """``{name}_rate`` per check: passes over the rows where it applies (None where it applied nowhere)."""
    rates: dict[str, float | None] = {}
    for name in dict.fromkeys(k for outcome in outcomes for k in outcome):
        applied = [o[name] for o in outcomes if o.get(name) is not None]
        rates[f"{name}_rate"] = sum(applied) / len(applied) if applied else None
    return rates


def check_verdicts(mine: Sequence[dict[str, bool | None]], theirs: Sequence[dict[str, bool | None]]) -> list[int]:
    """Per prompt: +1 when my reply passes more of the applicable checks than theirs, -1 when fewer, 0 on a tie.

    ``mine[i]`` maps each check's name to True/False, or None where the check does not apply to prompt i.
    """
    verdicts = []
    for a, b in zip(mine, theirs, strict=True):
        passed_a, passed_b = sum(v is True for v in a.values()), sum(v is True for v in b.values())
        verdicts.append((passed_a > passed_b) - (passed_a < passed_b))
    return verdicts


# ----------------------------------------------------------------------------------------------
# pairwise judges
# ----------------------------------------------------------------------------------------------

class PairwiseJudge(Protocol):
    def choose(self, prompts: Sequence[str], replies_a: Sequence[str], replies_b: Sequence[str]) -> list[Choice]:
        """For each prompt, which of the two replies (shown as A and B, in this order) is better."""


def swapped_verdicts(judge: PairwiseJudge, prompts: Sequence[str], mine: Sequence[str],
                     theirs: Sequence[str]) -> list[int]:
    """Ask in both orders: +1 when both prefer mine, -1 when both prefer theirs, 0 otherwise (a tie).

    Identical replies tie without asking.
    """
    asked = [i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a.strip() != b.strip()]
    pick = lambda seq: [seq[i] for i in asked]  # noqa: E731
    forward = judge.choose(pick(prompts), pick(mine), pick(theirs))
    backward = judge.choose(pick(prompts), pick(theirs), pick(mine))
    verdicts = [0] * len(prompts)
    for i, first, second in zip(asked, forward, backward, strict=True):
        if first == "A" and second == "B":
            verdicts[i] = 1
        elif first == "B" and second == "A":
            verdicts[i] = -1
    return verdicts


class EndpointJudge:
    """An OpenAI-compatible chat-completions endpoint (vLLM, TGI, llama.cpp server, OpenAI, ...)."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 rubric: str = RUBRIC):
        import requests

        # Plain HTTP, not huggingface_hub's client: that one refuses every URL under HF_HUB_OFFLINE, which
        # runs set for the weights, not for a judge the user serves themselves.
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.model, self.url, self.timeout, self.rubric = model, url.rstrip("/"), timeout, rubric

    def choose(self, prompts, replies_a, replies_b) -> list[Choice]:
        choices = []
        for prompt, a, b in zip(prompts, replies_a, replies_b, strict=True):
            payload = {"model": self.model, "messages": judge_prompt(prompt, a, b, self.rubric), "max_tokens": 4,
                       "temperature": 0.0}
            try:
                response = self.session.post(f"{self.url}/chat/completions", json=payload, timeout=self.timeout)
                response.raise_for_status()
                answer = response.json()["choices"][0]["message"]["content"]
            except Exception as err:  # connection refused, HTTP error, malformed JSON: say which endpoint
                raise LorelayError(f"judge endpoint {self.url} failed: {err}",
                                   hint="check evaluation.judge.url, endpoint_model and the API key") from None
            choices.append(parse_choice(answer or ""))
        return choices


class LocalModelJudge:
    """Another local causal LM: its next-token log-probability of ``A`` against ``B`` after the rubric."""

    def __init__(self, model_path: str | Path, device: str | None = None, rubric: str = RUBRIC):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), use_safetensors=True,
                                                          dtype=torch.float32).eval()
        device = device or ("cuda" if torch.cuda.is_available() else None)
        if device:
            self.model.to(device)
        self.rubric = rubric
        self.letters = [self.tokenizer.encode(letter, add_special_tokens=False)[0] for letter in ("A", "B")]

    def choose(self, prompts, replies_a, replies_b) -> list[Choice]:
        import torch

        from stages.core.chat import render_prompt

        choices: list[Choice] = []
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        try:
            for start in range(0, len(prompts), 8):
                texts = [render_prompt(self.tokenizer, judge_prompt(p, a, b, self.rubric))
                         for p, a, b in zip(prompts[start:start + 8], replies_a[start:start + 8],
                                            replies_b[start:start + 8], strict=True)]
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                with torch.no_grad():
                    logits = self.model(**batch.to(self.model.device)).logits[:, -1, self.letters]
                choices += ["A" if row[0] >= row[1] else "B" for row in logits.tolist()]
        finally:
            self.tokenizer.padding_side = side
        return choices


@dataclasses.dataclass
class JudgeConfig:
    model: str | None = field(None, help="A local causal LM (directory or Hub id in the cache) that no stage "
                                         "trained: it judges by its log-probability of A vs B.")
    url: str | None = field(None, help="Base URL of an OpenAI-compatible endpoint, e.g. http://host:8000/v1 "
                                       "(it is sent POST {url}/chat/completions).")
    endpoint_model: str | None = field(None, help="The `model` the endpoint is asked for (with url).")
    api_key_env: str | None = field(None, help="Name of the environment variable holding the endpoint's API key "
                                               "(the key itself never goes in a config file).")
    timeout: float = field(60.0, help="Seconds per endpoint request.")
    rubric: str = field(RUBRIC, help="The system prompt every comparison is judged by, the same for every pair; the "
                                     "default asks for exact, correct and concise.")

    def __post_init__(self):
        if (self.model is None) == (self.url is None):
            raise ConfigError("give either model (a local judge) or url (an endpoint), not both or neither",
                              field="model")
        if self.url is not None and not self.endpoint_model:
            raise ConfigError("an endpoint judge needs endpoint_model (the model name sent to it)",
                              field="endpoint_model")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"'{self.url}' is not an http(s) URL", field="url")

    def build(self) -> PairwiseJudge:
        if self.url is None:
            return LocalModelJudge(self.model, rubric=self.rubric)
        key = None
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(f"environment variable {self.api_key_env} is not set", field="api_key_env",
                                  hint=f"export {self.api_key_env}=... before the run")
        return EndpointJudge(self.url, self.endpoint_model, api_key=key, timeout=self.timeout, rubric=self.rubric)
