"""Evaluating each policy of a run: task accuracy, held-out perplexity, check pass rates, win rates.

Every policy (the bare base, then each policy stage) is evaluated right after it is trained, so gates can
use the numbers: ``task_accuracy``, ``heldout_perplexity`` and, per configured check, ``NAME_rate`` (the
share of replies to the held-out prompts that pass it, among those it applies to). Replies and their check
results are kept in ``eval/NAME.json``. At the end each stage is compared with its parent (the policy it
started from) on the same prompts by judges no stage trained against (``stages.core.judges``):

- ``check_*``: the reply passing more of the applicable checks wins;
- ``judge_*``: the configured pairwise judge (a local model or an endpoint), asked in both orders;

and, labelled as its opinion, ``rm_*``: the trained reward model, which may have picked the very pairs a
stage learned from. Prompts, greedy replies and reward-model scoring are ``stages.core.evaluation``'s, the
same functions the DPO recipe judges its policy with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipelines.revisions import base_revision
from stages.core.config import to_dict
from stages.core.data import DatasetSpec, data_hash, read_rows
from stages.core.errors import ConfigError
from stages.core.evaluation import (greedy_replies, judge_replies, perplexity_from_loss, read_prompts, reward_verdicts,
                                    task_accuracy)
from stages.core.judges import (check_outcomes, check_rates, check_verdicts, column_lists, swapped_verdicts,
                                tally)
from stages.core.lifecycle import borrow
from stages.core.modeling import LoraSettings, attach_adapter
from stages.core.rewards import check_rewards, load_rewards
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
        # Who judges the replies at the end does not change them: a new judge re-judges, it does not re-generate.
        # The base model and the evaluation files' contents are keyed too: a row from another base (or an
        # edited task file) is stale.
        replies_config = {k: v for k, v in to_dict(config).items() if k not in ("judge", "reward_model")}
        files = {str(path): data_hash(str(path)) for path in (config.tasks, config.prompts, config.perplexity_text)
                 if path is not None and Path(path).exists()}
        self.config_hash = hashlib.sha256(json.dumps({"config": replies_config, "files": files,
                                                      "base": base_revision(base)},
                                                     sort_keys=True, default=str).encode()).hexdigest()[:16]
        limit = config.max_items
        self.tasks = read_jsonl_rows(config.tasks, limit) if config.tasks else []
        rows = read_prompts(config.prompts, limit) if config.prompts else []
        self.prompts = [r["messages"] for r in rows]
        # A check reads the prompt rows' other columns (e.g. `queue`, `sign_off`); replies are its completions.
        self.columns = [{k: v for k, v in r["columns"].items() if k not in ("chosen", "rejected")} for r in rows]
        self.checks = load_rewards(config.checks, where="evaluation.checks")
        if self.checks and not rows:
            raise ConfigError("evaluation.checks judge the replies to evaluation.prompts: give prompts",
                              field="evaluation.prompts")
        if self.checks:  # a missing column or a broken function shows now, before any stage trains
            check_rewards(self.checks, self.prompts[:4], [""] * len(rows[:4]), column_lists(self.columns[:4]))

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
                result = task_accuracy(model, tokenizer, self.tasks, max_new_tokens=self.config.task_max_new_tokens,
                                       batch_size=self.config.batch_size)
                metrics["task_accuracy"] = result["accuracy"]
                examples = result["examples"]
            if self.config.perplexity_text:
                metrics["heldout_perplexity"] = text_perplexity(model, tokenizer, self.config.perplexity_text)
            replies = []
            if self.prompts:
                replies = greedy_replies(model, tokenizer, self.prompts, max_new_tokens=self.config.max_new_tokens,
                                         batch_size=self.config.batch_size)
        outcomes = check_outcomes(self.checks, self.prompts, replies, self.columns) if replies else []
        metrics.update({name: rate for name, rate in check_rates(outcomes).items() if rate is not None})
        if is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
            replies_file.write_text(json.dumps([{"prompt": p[-1]["content"], "reply": r, "checks": c}
                                                for p, r, c in zip(self.prompts, replies, outcomes or [{}] * len(replies))],
                                               indent=1, ensure_ascii=False))
        return {"config_hash": self.config_hash, "metrics": metrics, "examples": examples}

    def win_rates(self, run: dict[str, Any], reward_model_dir: Path | None) -> dict[str, dict[str, float]]:
        """Each policy stage against its parent on the held-out prompts: program checks, the configured
        judge, and the trained reward model's opinion (``reward_model_dir``, when given)."""
        policies = ["base"] + [s["name"] for s in run["stages"] if s.get("evaluation")]
        replies = {name: json.loads((self.folder / f"{name}.json").read_text()) for name in policies
                   if (self.folder / f"{name}.json").exists()}
        pairs = [(s["name"], s.get("init_from") or "base") for s in run["stages"]]
        pairs = [(name, parent) for name, parent in pairs if name in replies and parent in replies]
        if not pairs:
            return {}
        results: dict[str, dict[str, float]] = {name: {} for name, _ in pairs}
        if self.checks:
            for name, parent in pairs:
                results[name].update(tally(check_verdicts([r.get("checks") or {} for r in replies[name]],
                                                          [r.get("checks") or {} for r in replies[parent]]), "check_"))
        if self.config.judge is not None:
            self.console.print(f"[dim]judging {len(pairs)} policies against their parents with "
                               f"{self.config.judge.url or self.config.judge.model}, both orders...[/dim]")
            judge = self.config.judge.build()
            for name, parent in pairs:
                verdicts = swapped_verdicts(judge, [r["prompt"] for r in replies[name]],
                                            [r["reply"] for r in replies[name]], [r["reply"] for r in replies[parent]])
                results[name].update(tally(verdicts, "judge_"))
        if reward_model_dir is not None:
            texts = {name: [r["reply"] for r in rows] for name, rows in replies.items()}
            prompts = [[{"role": "user", "content": r["prompt"]}] for r in next(iter(replies.values()))]
            self.console.print(f"[dim]scoring {sum(map(len, texts.values()))} replies with {reward_model_dir}...[/dim]")
            by_policy = judge_replies(self.base, reward_model_dir, prompts, texts)
            for name, parent in pairs:
                mine, theirs = by_policy[name], by_policy[parent]
                verdicts = reward_verdicts(mine, theirs, my_replies=texts[name], their_replies=texts[parent])
                results[name].update(tally(verdicts, "rm_"), rm_mean_reward=sum(mine) / len(mine))
        return results
