"""Evaluation shared by stages and the pipeline report: generation, perplexity, task accuracy."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any


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


def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def task_accuracy(model, tokenizer, items: Sequence[dict], *, max_new_tokens: int = 32,
                  extract: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Exact-match accuracy of generated answers to ``{"prompt": str, "answer": str}`` items."""
    extract = extract or (lambda text: text)
    conversations = [[{"role": "user", "content": item["prompt"]}] for item in items]
    replies = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
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
