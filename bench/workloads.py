"""The long-reply workload: general-chat SFT samples and preference pairs generated here, seeded.

    python bench/workloads.py --out /tmp/long            # writes sft.jsonl and preferences.jsonl

The demo's triage data has short replies (a queue name, a sentence), the best case for computing logits on
reply tokens only. This workload is the opposite: prompts of 50-300 tokens and replies of 100-400 tokens
(SmolLM2 tokenizer), on everyday topics, some prompts multi-turn. The text is assembled from sentence
templates, so it costs nothing to make and is the same on every machine for a seed; it is not meant to be
learnable, only to have the lengths of real chat data. Pairs have two replies of independent lengths.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
PROMPT_TOKENS = (50, 300)
REPLY_TOKENS = (100, 400)

TOPICS = ["sourdough bread", "a first marathon", "repotting a fig tree", "learning the cello", "a week in Lisbon",
          "saving for a flat", "a noisy neighbour", "switching careers to nursing", "teaching a dog to heel",
          "a vegetable patch on a balcony", "choosing a used bicycle", "writing a wedding toast",
          "a leaking kitchen tap", "planning a reading list", "sleep and coffee", "a small business website"]
ASKS = ["Can you help me think through {t}?", "I keep getting stuck with {t}. Where should I start?",
        "What would you do about {t}?", "Give me a plan for {t}.", "Explain the basics of {t} to me."]
CONTEXT = ["I have about {n} hours a week for it.", "Last time I tried, it went badly because I rushed.",
           "My budget is around {n} euros.", "A friend said it is easier than it looks, but I doubt it.",
           "I would like to see progress within {n} weeks.", "I live in a small flat with little storage.",
           "I tend to lose motivation after the first few days.", "I read a few guides but they disagreed.",
           "I am a complete beginner, so please keep the jargon down.", "This matters to me more than I expected."]
REPLY = ["Start small with {t}: pick one thing you can finish this week and do it before anything else.",
         "The most common mistake with {t} is trying to change everything at once, so change one variable at a time.",
         "Write down what you did and what happened; after {n} tries the pattern is usually obvious.",
         "If something feels wrong, stop and check the basics before buying anything new.",
         "Set a fixed time for it, because a habit survives a bad day better than a good intention.",
         "Ask someone who has done {t} to look at your first attempt; ten minutes of feedback saves hours.",
         "Expect the second week to feel harder than the first, which is normal and passes.",
         "Keep the cost low at the start, roughly {n} euros, until you know you will stick with it.",
         "When you hit a plateau, rest for a day and then repeat the simplest version of the task.",
         "Measure progress by what you can do now that you could not do a month ago."]


def _fill(rng: random.Random, pool: list[str], topic: str) -> str:
    return rng.choice(pool).format(t=topic, n=rng.randint(2, 40))


def _grow(rng, tokenizer, pool, topic, low, high, start="") -> str:
    """Sentences from ``pool`` until the text has between ``low`` and ``high`` tokens."""
    def length(value: str) -> int:
        return len(tokenizer(value, add_special_tokens=False)["input_ids"])

    target = rng.randint(low, high)
    text = start
    while length(text) < target:
        longer = (text + " " if text else "") + _fill(rng, pool, topic)
        if length(longer) > high and length(text) >= low:
            break
        text = longer
    return text


def _prompt(rng, tokenizer, topic) -> list[dict]:
    """A user turn of 50-300 tokens; one in three prompts has an earlier exchange before it."""
    ask = _fill(rng, ASKS, topic)
    if rng.random() < 1 / 3:
        earlier = [{"role": "user", "content": _fill(rng, ASKS, topic)},
                   {"role": "assistant", "content": _fill(rng, REPLY, topic)}]
        budget = max(PROMPT_TOKENS[0], rng.randint(*PROMPT_TOKENS) - 60)
        return earlier + [{"role": "user", "content": _grow(rng, tokenizer, CONTEXT, topic, 20, budget, ask)}]
    return [{"role": "user", "content": _grow(rng, tokenizer, CONTEXT, topic, *PROMPT_TOKENS, ask)}]


def long_reply_workload(tokenizer, count: int, seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(SFT records, preference pairs), ``count`` of each."""
    rng = random.Random(seed)
    sft, pairs = [], []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        sft.append({"messages": _prompt(rng, tokenizer, topic)
                    + [{"role": "assistant", "content": _grow(rng, tokenizer, REPLY, topic, *REPLY_TOKENS)}]})
        topic = rng.choice(TOPICS)
        pairs.append({"prompt": _prompt(rng, tokenizer, topic),
                      "chosen": [{"role": "assistant", "content": _grow(rng, tokenizer, REPLY, topic, *REPLY_TOKENS)}],
                      "rejected": [{"role": "assistant",
                                    "content": _grow(rng, tokenizer, REPLY, topic, *REPLY_TOKENS)}]})
    return sft, pairs


def write_long_reply_workload(directory: Path, count: int, model: str = "embedded:smollm2-135m-instruct") -> dict:
    """Write ``sft.jsonl`` and ``preferences.jsonl`` into ``directory``; their paths."""
    from transformers import AutoTokenizer

    from stages.core.default_model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    sft, pairs = long_reply_workload(tokenizer, count)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"sft": directory / "sft.jsonl", "preferences": directory / "preferences.jsonl"}
    for key, rows in (("sft", sft), ("preferences", pairs)):
        paths[key].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=64)
    options = parser.parse_args(argv)
    for path in write_long_reply_workload(options.out, options.count).values():
        print(path)
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
