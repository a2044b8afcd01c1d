"""Evaluation shared by stages and the pipeline report: prompts, generation, win rates, perplexity, task accuracy.

One place samples and judges: the DPO recipe (policy against its reference) and ``pipelines/evaluate.py``
(each policy of a run against its parent) both read prompts with ``read_prompts``, reply with
``generate``, score replies with ``judge_replies`` (one reward-model pass on the shared base, from
``stages.core.scoring``) and compare them with ``reward_verdicts``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stages.core import scoring
from stages.core.data import DatasetSpec, read_rows
from stages.core.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


# ----------------------------------------------------------------------------------------------
# prompts and replies
# ----------------------------------------------------------------------------------------------

def read_prompts(spec: DatasetSpec | str | Path, limit: int | None = None) -> list[dict]:
    """Prompt rows to reply to: ``{"messages": [... ending in a user turn], "source": "file:line", "columns": {...}}``.

    A row has a ``prompt`` string, or a ``prompt``/``messages`` list of ``{role, content}`` messages ending in a
    user turn; its other columns (e.g. a check's ``queue``) are kept in ``columns``. A bad row is a DataError
    naming its line.
    """
    spec = spec if isinstance(spec, DatasetSpec) else DatasetSpec(path=str(spec))
    prompts: list[dict] = []
    for where, row in read_rows(spec):
        if isinstance(row, Exception):
            raise row
        columns = {k: v for k, v in row.items() if k not in ("prompt", "messages")} if isinstance(row, dict) else {}
        prompts.append({"messages": prompt_messages(row, where), "source": where.source, "columns": columns})
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError("no prompts", file=spec.path)
    return prompts


def prompt_messages(row: Any, where) -> list[dict]:
    """The conversation a prompt row asks to continue (``where`` is the row's ``read_rows`` location)."""
    value = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                  and m.get("role") in ROLES for m in value)):
        if value[-1]["role"] != "user":
            raise where.error("prompt", f"the prompt must end with a user turn, not '{value[-1]['role']}'",
                              field="prompt")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise where.error("prompt", "expected a non-empty `prompt` string, or a `prompt`/`messages` list of "
                                "{role, content} messages ending in a user turn", field="prompt")


def generate(model, tokenizer, conversations: Sequence[list[dict]], *, max_new_tokens: int = 64,
             batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             num_return_sequences: int = 1, seed: int | None = None) -> list[list[str]]:
    """Reply to each conversation (a list of messages ending in a user turn) with the chat template.

    Returns ``num_return_sequences`` completions per conversation. Left padding so every row's
    generation starts right after its own prompt.
    """
    import torch

    from stages.core.chat import render_prompt

    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[list[str]] = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            prompts = [render_prompt(tokenizer, conv) for conv in chunk]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                        temperature=temperature if do_sample else None,
                                        top_p=top_p if do_sample else None, top_k=None,
                                        num_return_sequences=num_return_sequences,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                        use_cache=True)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i in range(len(chunk)):
                results.append([t.strip() for t in texts[i * num_return_sequences:(i + 1) * num_return_sequences]])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return results


def greedy_replies(model, tokenizer, prompts: Sequence[list[dict]], *, max_new_tokens: int = 64,
                   batch_size: int = 8) -> list[str]:
    """One greedy reply per prompt conversation."""
    if not prompts:
        return []
    return [r[0] for r in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)]


def sample_generations(model, tokenizer, records: Sequence[dict], *, count: int = 4,
                       max_new_tokens: int = 64) -> list[dict[str, Any]]:
    """Greedy replies to the first ``count`` held-out prompts, with the reference answer beside them."""
    prompts, references = [], []
    for record in records[:count]:
        messages = record["messages"]
        last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:last_assistant])
        references.append(messages[last_assistant]["content"])
    if not prompts:
        return []
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [{"prompt": p[-1]["content"], "reference": r, "generated": g[0]}
            for p, r, g in zip(prompts, references, replies)]


# ----------------------------------------------------------------------------------------------
# win rates: replies to the same prompts, judged by a reward model
# ----------------------------------------------------------------------------------------------

def judge_replies(base, rm_dir: str | Path, prompts: Sequence[list[dict]], replies: dict[str, Sequence[str]], *,
                  batch_size: int = 8) -> dict[str, list[float]]:
    """Reward-model scores of each policy's replies to ``prompts``, all in one pass.

    Call it with no adapter on ``base``: ``scoring.reward_model`` puts the reward adapter and its head on the
    same base and takes them off again.
    """
    conversations, spans = [], {}
    for name, texts in replies.items():
        spans[name] = (len(conversations), len(conversations) + len(texts))
        conversations += [list(p) + [{"role": "assistant", "content": text}] for p, text in zip(prompts, texts)]
    if not conversations:
        return {name: [] for name in replies}
    with scoring.reward_model(base, rm_dir) as judge:
        scores = scoring.score(judge, base.tokenizer, conversations, batch_size=batch_size)
    return {name: scores[a:b] for name, (a, b) in spans.items()}


def reward_verdicts(mine: Sequence[float], theirs: Sequence[float], *, my_replies: Sequence[str] | None = None,
                    their_replies: Sequence[str] | None = None, tie_margin: float = 0.0) -> list[int]:
    """Per prompt +1 (``mine`` scored higher), -1 (lower) or 0, as ``stages.core.judges.tally`` counts them.

    0, a tie: scores within ``tie_margin``, or the same reply text (whose scores differ only by batch rounding).
    """
    verdicts = []
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        same_text = my_replies is not None and their_replies is not None and my_replies[index] == their_replies[index]
        verdicts.append(0 if same_text or abs(a - b) <= tie_margin else 1 if a > b else -1)
    return verdicts


# ----------------------------------------------------------------------------------------------
# task accuracy and perplexity
# ----------------------------------------------------------------------------------------------

def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def task_accuracy(model, tokenizer, items: Sequence[dict], *, max_new_tokens: int = 32,
                  extract: Callable[[str], str] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Exact-match accuracy of generated answers to ``{"prompt": str, "answer": str}`` items."""
    extract = extract or (lambda text: text)
    conversations = [[{"role": "user", "content": item["prompt"]}] for item in items]
    replies = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = [normalise_answer(extract(r[0])) == normalise_answer(item["answer"]) for r, item in zip(replies, items)]
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct),
            "examples": [{"prompt": i["prompt"], "answer": i["answer"], "generated": r[0], "correct": c}
                         for i, r, c in list(zip(items, replies, correct))[:5]]}


def mean_token_loss(model, batches) -> float:
    """Mean next-token loss over loss-bearing tokens of ``batches`` (dicts with input_ids, labels)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            out = model(**batch, use_cache=False)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total / max(count, 1)


def perplexity_from_loss(loss: float) -> float:
    return float(math.exp(min(loss, 50.0)))
