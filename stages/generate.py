"""On-policy preference data: sample from the current policy, judge with the reward model, keep pairs.

For each held-out prompt the policy (base + incoming adapter) samples ``samples_per_prompt`` replies;
the reward model (a reward stage directory, put on the same shared base) scores them; the best and
the worst reply become a preference pair for DPO, with their scores and the policy and reward
model they came from recorded as provenance. Prompts whose replies all score alike are dropped.

Output directory: ``dataset.jsonl`` (preference rows stages.core.data reads), ``metrics.json``,
``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from stages.core.config import field
from stages.core.data import DatasetSpec, read_rows
from stages.core.errors import ConfigError, DataError
from stages.core.evaluation import generate
from stages.core.modeling import Base, LoraSettings, ModelConfig, attach_adapter, detach_adapter
from stages.core.training import StageOutput, is_main_process


@dataclasses.dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="Base model (a pipeline shares its own).")
    lora: LoraSettings = field(default_factory=LoraSettings, help="Unused: the policy adapter comes from the previous stage.")
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="data/demo/prompts.jsonl"),
                                 help="Prompts: rows with a `prompt` string or `messages` ending in a user turn.")
    reward_model: Path | None = field(None, help="Reward stage directory that judges the samples (required).")
    samples_per_prompt: int = field(4, help="Replies sampled per prompt; the best and worst form a pair.")
    max_prompts: int | None = field(None, help="Use only the first N prompts.")
    max_new_tokens: int = field(64, help="Length limit of each sampled reply.")
    temperature: float = field(0.9, help="Sampling temperature.")
    top_p: float = field(0.95, help="Nucleus sampling mass.")
    min_score_gap: float = field(0.1, help="Drop prompts whose best and worst reply differ by less than this.")
    batch_size: int = field(8, help="Prompts per generation batch.")
    seed: int = field(42, help="Sampling seed.")
    output_dir: Path = field(Path("outputs/generate"), help="Where the dataset is written (atomically).")

    def __post_init__(self):
        if self.samples_per_prompt < 2:
            raise ConfigError("at least 2 samples are needed to form a pair", field="samples_per_prompt")


def load_prompts(spec: DatasetSpec, limit: int | None) -> list[dict]:
    """Prompt conversations (message lists ending in a user turn) with their source line."""
    prompts = []
    for where, row in read_rows(spec):
        if isinstance(row, Exception):
            raise row
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            messages = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
        else:
            raise where.error("prompt", "expected a non-empty `prompt` string or a `messages` list",
                              field="prompt")
        prompts.append({"messages": messages, "source": where.source})
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError("no prompts", file=spec.path)
    return prompts


def best_and_worst(replies: list[str], scores: list[float]) -> tuple[int, int]:
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    return best, worst


def run(config: GenerateConfig, base: Base, adapter: str | Path | None = None) -> Path:
    """Sample, judge and pair; return the output directory holding ``dataset.jsonl``."""
    from stages.reward import reward_model, score

    if config.reward_model is None or not Path(config.reward_model).exists():
        raise ConfigError("a reward stage directory is needed to judge samples", field="reward_model")
    output = StageOutput(config.output_dir, stage="generate")
    prompts = load_prompts(config.prompts, config.max_prompts)

    # ---- sample from the policy ------------------------------------------------------------------
    started = time.time()
    policy = (attach_adapter(base.model, config.lora, init_from=adapter,
                             allow_pickle_weights=base.config.allow_pickle_weights) if adapter else base.model)
    try:
        samples = generate(policy, base.tokenizer, [p["messages"] for p in prompts], do_sample=True,
                           temperature=config.temperature, top_p=config.top_p,
                           num_return_sequences=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
                           batch_size=config.batch_size, seed=config.seed)
    finally:
        if adapter:
            detach_adapter(policy)
    output.mark("sample", started)

    # ---- judge with the reward model -------------------------------------------------------------
    started = time.time()
    conversations = [p["messages"] + [{"role": "assistant", "content": reply}]
                     for p, replies in zip(prompts, samples) for reply in replies]
    with reward_model(base, config.reward_model) as judge:
        flat_scores = score(judge, base.tokenizer, conversations, batch_size=config.batch_size)
    output.mark("score", started)

    # ---- keep best and worst as pairs --------------------------------------------------------------
    n = config.samples_per_prompt
    rows, dropped = [], 0
    for index, (prompt, replies) in enumerate(zip(prompts, samples)):
        scores = flat_scores[index * n:(index + 1) * n]
        best, worst = best_and_worst(replies, scores)
        gap = scores[best] - scores[worst]
        if gap < config.min_score_gap or replies[best].strip() == replies[worst].strip():
            dropped += 1
            continue
        rows.append({"prompt": prompt["messages"],
                     "chosen": [{"role": "assistant", "content": replies[best]}],
                     "rejected": [{"role": "assistant", "content": replies[worst]}],
                     "margin": round(gap, 4),
                     "provenance": {"prompt_source": prompt["source"], "policy": str(adapter or "base"),
                                    "reward_model": str(config.reward_model), "scores": scores}})
    if not rows:
        raise DataError("every prompt's samples scored alike; no preference pair was formed",
                        hint="raise temperature or samples_per_prompt, or lower min_score_gap")
    metrics = {"prompts": len(prompts), "pairs": len(rows), "dropped_low_gap": dropped,
               "mean_gap": sum(r["margin"] for r in rows) / len(rows),
               "mean_best_score": sum(max(flat_scores[i * n:(i + 1) * n]) for i in range(len(prompts))) / len(prompts),
               "mean_score": sum(flat_scores) / len(flat_scores)}
    if is_main_process():
        with open(output.staging / "dataset.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        output.write_json("metrics.json", metrics)
        output.commit(config=config, base=base, metrics=metrics,
                      extra={"policy_adapter": str(adapter) if adapter else None})
    return output.output_dir
