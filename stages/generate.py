"""On-policy preference data: sample from the current policy, judge with the reward model and the checks.

For each prompt the policy (base + incoming adapter) samples ``samples_per_prompt`` replies; the reward
model (a reward stage directory, put on the same shared base) scores them, and the configured ``checks``
(programmatic rewards, ``stages.core.rewards``) pass or fail each one. The chosen reply is the best-scored
among those that pass every check that applies to the prompt, so no pair teaches a wrong answer; the
rejected one is the worst-scored reply that fails a check, or the worst-scored of all when none fails.
A pair whose rejected reply fails a check is kept even when the reward model preferred it: the check
outranks the model. Prompts with no passing reply, or whose pair the reward model cannot tell apart
(gap below ``min_score_gap``, when the checks do not decide), are dropped and counted.
Scores, check results, the policy and the reward model are recorded as each pair's provenance.

Output directory: ``dataset.jsonl`` (preference rows stages.core.data reads), ``metrics.json``,
``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from stages.core import scoring
from stages.core.config import field
from stages.core.data import DatasetSpec
from stages.core.data.sample import SAMPLE_ROWS
from stages.core.errors import ConfigError, DataError
from stages.core.evaluation import generate, read_prompts
from stages.core.lifecycle import borrows_base
from stages.core.modeling import Base, LoraSettings, ModelConfig, attach_adapter, detach_adapter
from stages.core.judges import check_outcomes, check_rates, column_lists
from stages.core.rewards import Reward, RewardSpec, check_rewards, load_rewards
from stages.core.stage import Metric, Stage
from stages.core.training import StageOutput, is_main_process


@dataclasses.dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="Base model (a pipeline shares its own).")
    lora: LoraSettings = field(default_factory=LoraSettings, help="Unused: the policy adapter comes from the previous stage.")
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="data/demo/prompts.jsonl"),
                                 help="Prompts: rows with a `prompt` string or `messages` ending in a user turn.")
    reward_model: Path | None = field(None, help="Reward stage directory that judges the samples (required).")
    checks: list[RewardSpec] = field(
        default_factory=list, help="Programmatic checks (fn/args, as GRPO's rewards) a chosen reply must pass, each "
                                   "where it applies; they read the prompt rows' other columns (e.g. queue).")
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
        for name in ("max_new_tokens", "batch_size", "max_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"must be at least 1, got {value}", field=name)
        if not self.temperature > 0:
            raise ConfigError(f"must be above 0 for sampling, got {self.temperature}", field="temperature",
                              hint="replies sampled at temperature 0 are all alike and form no pair")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.top_p}", field="top_p")


def check_results(checks: list[Reward], prompts: list[dict], replies: list[list[str]]) -> list[list[dict]]:
    """Per prompt, per reply: {check name: True/False, or None where it does not apply}."""
    flat = check_outcomes(checks, [p["messages"] for p, rs in zip(prompts, replies) for _ in rs],
                          [r for rs in replies for r in rs],
                          [p["columns"] for p, rs in zip(prompts, replies) for _ in rs])
    starts = [0]
    for rs in replies:
        starts.append(starts[-1] + len(rs))
    return [flat[a:b] for a, b in zip(starts, starts[1:])]


def choose_pair(scores: list[float], checks: list[dict]) -> tuple[int, int] | None:
    """(chosen, rejected): the best-scored reply that fails no check, and the worst-scored one that fails a
    check (or the worst of all when none fails). None when no reply passes."""
    passing = [i for i, c in enumerate(checks) if False not in c.values()]
    if not passing:
        return None
    chosen = max(passing, key=scores.__getitem__)
    failing = [i for i, c in enumerate(checks) if False in c.values()]
    rejected = min(failing or [i for i in range(len(scores)) if i != chosen], key=scores.__getitem__)
    return chosen, rejected


@borrows_base
def run(config: GenerateConfig, base: Base, adapter: str | Path | None = None) -> Path:
    """Sample, judge and pair; return the output directory holding ``dataset.jsonl``."""
    if config.reward_model is None or not Path(config.reward_model).exists():
        raise ConfigError("a reward stage directory is needed to judge samples", field="reward_model")
    output = StageOutput(config.output_dir, stage="generate")
    prompts = read_prompts(config.prompts, config.max_prompts)
    # Checks fail now, before any model work, on a missing column or a function that breaks on these rows.
    checks = load_rewards(config.checks, where=str(config.prompts.path))
    trial = prompts[:4]
    check_rewards(checks, [p["messages"] for p in trial], [""] * len(trial), column_lists([p["columns"] for p in trial]))

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
    with scoring.reward_model(base, config.reward_model) as judge:
        flat_scores = scoring.score(judge, base.tokenizer, conversations, batch_size=config.batch_size)
    output.mark("score", started)

    # ---- pair: chosen passes every check, rejected is the worst (a failing one when there is one) ----------
    n = config.samples_per_prompt
    results = check_results(checks, prompts, samples) if checks else [[{} for _ in rs] for rs in samples]
    rows, dropped = [], {"no_passing_reply": 0, "low_gap": 0}
    for index, (prompt, replies) in enumerate(zip(prompts, samples)):
        scores = flat_scores[index * n:(index + 1) * n]
        pair = choose_pair(scores, results[index])
        if pair is None:
            dropped["no_passing_reply"] += 1
            continue
        best, worst = pair
        gap = scores[best] - scores[worst]
        decided_by_checks = False in results[index][worst].values()
        if replies[best].strip() == replies[worst].strip() or (not decided_by_checks and gap < config.min_score_gap):
            dropped["low_gap"] += 1
            continue
        rows.append({"prompt": prompt["messages"],
                     "chosen": [{"role": "assistant", "content": replies[best]}],
                     "rejected": [{"role": "assistant", "content": replies[worst]}],
                     **({"margin": round(gap, 4)} if gap > 0 else {}),
                     "provenance": {"prompt_source": prompt["source"], "policy": str(adapter or "base"),
                                    "reward_model": str(config.reward_model), "scores": scores,
                                    "checks": {"chosen": results[index][best], "rejected": results[index][worst]},
                                    "decided_by": "checks" if decided_by_checks else "reward_model"}})
    if not rows:
        raise DataError(f"no preference pair was formed ({dropped['no_passing_reply']} prompts had no reply "
                        f"passing every check, {dropped['low_gap']} scored alike)",
                        hint="raise temperature or samples_per_prompt, lower min_score_gap, or check the checks")
    sampled = [c for per_prompt in results for c in per_prompt]
    metrics = {"prompts": len(prompts), "pairs": len(rows), "dropped_low_gap": dropped["low_gap"],
               "dropped_no_passing_reply": dropped["no_passing_reply"],
               "pairs_decided_by_checks": sum(r["provenance"]["decided_by"] == "checks" for r in rows),
               "mean_gap": sum(r.get("margin", 0.0) for r in rows) / len(rows),
               "mean_best_score": sum(max(flat_scores[i * n:(i + 1) * n]) for i in range(len(prompts))) / len(prompts),
               "mean_score": sum(flat_scores) / len(flat_scores)}
    # how often the policy's samples pass: what the pairs had to work with
    metrics.update({f"sample_{name}": rate for name, rate in check_rates(sampled).items()})
    if is_main_process():
        with open(output.staging / "dataset.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        output.write_json("metrics.json", metrics)
        output.commit(config=config, base=base, metrics=metrics,
                      extra={"policy_adapter": str(adapter) if adapter else None})
    return output.output_dir


def preflight(config: GenerateConfig, skip=lambda path: False) -> None:
    """A reward model is named, its checks import, and the first prompts read as run() reads them."""
    if config.reward_model is None:
        raise ConfigError("a reward stage directory is needed to judge samples", field="reward_model",
                          hint="in a pipeline: inputs: {reward_model: rm}")
    if not skip(str(config.reward_model)) and not Path(config.reward_model).is_dir():
        raise ConfigError("no such reward stage directory", file=config.reward_model, field="reward_model")
    load_rewards(config.checks, where="checks")
    if not skip(config.prompts.path):
        read_prompts(config.prompts, SAMPLE_ROWS)


STAGE = Stage(
    name="generate", config_class=GenerateConfig, run=run,
    description="On-policy pairs: sample, score by RM and checks, pair.",
    produces_policy=False,
    headline=(Metric("pairs", "pairs", "{:d}"),),
    metrics=("prompts", "pairs", "dropped_low_gap", "dropped_no_passing_reply", "pairs_decided_by_checks",
             "mean_gap", "mean_best_score", "mean_score", "sample_*_rate"),
    preflight=preflight,
)
