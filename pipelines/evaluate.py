"""Evaluating each policy of a run: task accuracy, held-out perplexity, judged win rates.

Every policy (the bare base, then each cpt/sft/dpo stage) is evaluated right after it is trained, so
gates can use the numbers. Replies to the held-out prompts are kept in ``eval/NAME.json``; at the end
the reward model judges all of them in one pass, and each stage's win rate is counted against its
parent (the policy it started from): a win when the judge scores its reply higher on the same prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stages.core.config import to_dict
from stages.core.data import DatasetSpec, read_rows
from stages.core.evaluation import generate, perplexity_from_loss, task_accuracy
from stages.core.lifecycle import borrow
from stages.core.modeling import LoraSettings, attach_adapter
from stages.core.training import is_main_process


def read_jsonl_rows(path: Path, limit: int | None) -> list[dict]:
    rows = []
    for _, row in read_rows(DatasetSpec(path=str(path))):
        if isinstance(row, Exception):
            raise row
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def text_perplexity(model, tokenizer, path: Path, block_size: int = 256) -> float:
    """Perplexity of a held-out text file, in non-overlapping blocks of ``block_size`` tokens."""
    import torch

    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, max(len(ids) - 1, 1), block_size):
            block = torch.tensor([ids[start:start + block_size]], device=device)
            if block.shape[1] < 2:
                continue
            loss = model(input_ids=block, labels=block, use_cache=False).loss
            total += float(loss) * (block.shape[1] - 1)
            count += block.shape[1] - 1
    model.train(was_training)
    return perplexity_from_loss(total / max(count, 1))


class Evaluator:
    def __init__(self, config, base, run_dir: Path, console):
        self.config = config
        self.base = base
        self.folder = Path(run_dir) / "eval"
        self.console = console
        self.config_hash = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:16]
        limit = config.max_items
        self.tasks = read_jsonl_rows(config.tasks, limit) if config.tasks else []
        self.prompts = [[{"role": "user", "content": r["prompt"]}]
                        for r in (read_jsonl_rows(config.prompts, limit) if config.prompts else [])]

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.prompts or self.config.perplexity_text)

    def policy(self, name: str, adapter_dir: Path | None, cached: dict | None) -> dict[str, Any] | None:
        """Metrics of one policy (base + adapter), reusing ``cached`` when nothing changed."""
        if not self.enabled:
            return None
        replies_file = self.folder / f"{name}.json"
        if cached and cached.get("config_hash") == self.config_hash and (replies_file.exists() or not self.prompts):
            return cached
        self.console.print(f"[dim]evaluating {name}...[/dim]")
        with borrow(self.base, adapter_dir) as model:
            if adapter_dir:
                model = attach_adapter(model, LoraSettings(), init_from=adapter_dir)
            tokenizer = self.base.tokenizer  # with the adapter's added tokens, if it has any
            metrics, examples = {}, []
            if self.tasks:
                result = task_accuracy(model, tokenizer, self.tasks, max_new_tokens=self.config.task_max_new_tokens)
                metrics["task_accuracy"] = result["accuracy"]
                examples = result["examples"]
            if self.config.perplexity_text:
                metrics["heldout_perplexity"] = text_perplexity(model, tokenizer, self.config.perplexity_text)
            replies = []
            if self.prompts:
                replies = [r[0] for r in generate(model, tokenizer, self.prompts,
                                                  max_new_tokens=self.config.max_new_tokens)]
        if is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
            replies_file.write_text(json.dumps([{"prompt": p[-1]["content"], "reply": r}
                                                for p, r in zip(self.prompts, replies)], indent=1, ensure_ascii=False))
        return {"config_hash": self.config_hash, "metrics": metrics, "examples": examples}

    def win_rates(self, judge_dir: Path, run: dict[str, Any]) -> dict[str, dict[str, float]]:
        """Each policy stage against its parent, judged by the reward model on the held-out prompts."""
        from stages.reward import reward_model, score

        policies = ["base"] + [s["name"] for s in run["stages"] if s.get("evaluation")]
        replies = {name: json.loads((self.folder / f"{name}.json").read_text()) for name in policies
                   if (self.folder / f"{name}.json").exists()}
        conversations, index = [], {}
        for name, rows in replies.items():
            index[name] = len(conversations)
            conversations += [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["reply"]}]
                              for r in rows]
        if not conversations:
            return {}
        self.console.print(f"[dim]judging {len(conversations)} replies with {judge_dir}...[/dim]")
        with reward_model(self.base, judge_dir) as judge:
            scores = score(judge, self.base.tokenizer, conversations)
        by_policy = {name: scores[index[name]:index[name] + len(rows)] for name, rows in replies.items()}
        results = {}
        for stage in run["stages"]:
            name, parent = stage["name"], stage.get("init_from") or "base"
            if name not in by_policy or parent not in by_policy:
                continue
            mine, theirs = by_policy[name], by_policy[parent]
            wins = sum(a > b for a, b in zip(mine, theirs))
            losses = sum(a < b for a, b in zip(mine, theirs))
            results[name] = {"win_rate_vs_parent": wins / len(mine), "loss_rate_vs_parent": losses / len(mine),
                             "wins": wins, "losses": losses, "ties": len(mine) - wins - losses,
                             "mean_reward": sum(mine) / len(mine)}
        return results
