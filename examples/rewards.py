"""Checks of your own: the demo's support-desk rules, as rewards a config names by ``file.py:function``.

    evaluation:
      checks:
        - {fn: "examples/rewards.py:queue_only"}
        - {fn: "examples/rewards.py:no_queue_label", args: {queues: [payment, delivery]}}

A reward takes the completions (and the prompts) plus any data column it names as a parameter, here
``kind``, and returns one value per completion: 1.0 passes, 0.0 fails, None where the rule does not apply
(a triage rule says nothing about a company answer). The same function works as a GRPO reward, a
``generate`` filter and an evaluation check. ``module:function`` works too when the module is importable.
"""

from __future__ import annotations

from stages.core.rewards import text_of  # a completion is a string, or a message list in chat data

DEMO_QUEUES = ("payment", "delivery", "technical", "account", "returns")


def _label(line: str) -> str:
    return line.strip().strip(".,:;!*`'\"").casefold()


def queue_only(completions: list[str], kind: list[str], queues: list[str] = DEMO_QUEUES,
               **_) -> list[float | None]:
    """A ticket is answered with a queue name and nothing else (right or wrong is exact_match's business)."""
    return [float(_label(text_of(reply)) in queues) if row_kind == "triage" else None
            for reply, row_kind in zip(completions, kind, strict=True)]


def no_queue_label(completions: list[str], kind: list[str], queues: list[str] = DEMO_QUEUES,
                   **_) -> list[float | None]:
    """A company answer carries no line that is a queue label ("...a full charge.\\n\\ntechnical")."""
    return [float(not any(_label(line) in queues for line in text_of(reply).splitlines())) if row_kind == "question"
            else None for reply, row_kind in zip(completions, kind, strict=True)]
