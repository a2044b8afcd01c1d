"""Reward model: TRL's RewardTrainer over a LoRA adapter and a scalar score head on the shared base.

This recipe supports:
- packed pairs (``data.padding_free``, on by default): the tokens both sides of a pair begin with once, each
  side's score read at its end (``stages.core.preference.reward_step``); TRL's padded batches where the model
  or attention kernel rules that out, with the reason printed and kept in metrics.json (``batching``);
- preference data in every form ``stages.core.data`` reads: explicit prompt (``prompt``/``chosen``/``rejected``
  as strings or message lists) and implicit prompt (two whole conversations sharing a prefix), with an
  optional ``margin`` (or ``score_chosen``/``score_rejected``) that enters the loss as
  ``-log sigmoid(r_chosen - r_rejected - margin)``;
- one set of base weights: the classifier is ``stages.core.scoring.sequence_classifier`` (a score head on the
  very backbone modules of the causal LM), wrapped in a LoRA adapter whose ``modules_to_save`` holds the
  head, so adapter and head are trained and saved together (``stages.core.scoring``);
- starting from an incoming adapter (usually SFT): its LoRA weights are mapped onto the classifier and the
  head starts fresh;
- QLoRA (4-bit base) on CUDA, fp32 LoRA on CPU.

Assumptions:
- A conversation is scored at its last token that is not the pad token (how transformers' sequence
  classifiers pool). Padding is on the right, so a padded row pools at the same position as the row alone;
  ChatML ends a turn with ``<|im_end|>\\n``, so with SmolLM2's pad == eos == ``<|im_end|>`` the pooled
  token is that final newline.

Output directory: adapter (LoRA + score head in ``modules_to_save``), tokenizer with chat template,
metrics.json (eval accuracy, mean margin, score distribution, train loss, log history), manifest.json.

Scoring with the finished model (``score``, ``reward_model``) lives in the block ``stages.core.scoring``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from stages.core import compat
from stages.core.config import field
from stages.core.data import DatasetSpec, load_mixture
from stages.core.data.sample import sample_stage_data
from stages.core.errors import ConfigError, DataError, LorelayError
from stages.core.lifecycle import borrows_base
from stages.core.modeling import Base, LoraSettings, ModelConfig
from stages.core.preference.batching import report_batching
from stages.core.preference.losses import reward_pair_loss
from stages.core.scoring import (attach_reward_adapter, check_bare, conversation_ids, detach_reward_adapter,
                                 score_ids, sequence_classifier)
from stages.core.stage import FIT_METRICS, Metric, Stage
from stages.core.training import (StageOutput, TrainingConfig, callbacks, check_trl_args, fit, is_main_process,
                                  quiet_trainer, trainable_parameters, trainer_args)



@dataclasses.dataclass
class RewardData:
    datasets: list[DatasetSpec] = field(default_factory=list, help="Preference datasets, mixed by weight or sample count.")
    eval_datasets: list[DatasetSpec] = field(default_factory=list, help="Held-out preference datasets; when empty, eval_ratio splits the training mix.")
    eval_ratio: float = field(0.05, help="Fraction of the training mix held out for evaluation (seeded).")
    max_length: int | None = field(1024, help="Longer conversations are truncated (and counted); None keeps all.")
    truncation_side: Literal["left", "right"] = field(
        "left", help="left keeps the end of a long conversation, where its score is read; right keeps its start.")
    use_margin: bool = field(True, help="Put each pair's margin (when the data has one) into the loss.")
    padding_free: bool | None = field(
        None, help="null: lorelay's packed rows (no padding; the tokens both sides of a pair begin with, once; "
                   "stages/core/preference/reward_step.py) wherever the model and attention kernel allow it, else "
                   "TRL's padded batches with the reason printed; true: refuse to pad; false: TRL's padded batches.")
    skip_invalid: bool = field(False, help="Skip malformed rows (counted in metrics) instead of stopping.")

    def __post_init__(self):
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="eval_ratio")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("must be at least 2 tokens, or null", field="max_length")


@dataclasses.dataclass
class RewardConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="Base model (ignored inside a pipeline, which shares its base).")
    lora: LoraSettings = field(default_factory=LoraSettings, help="Adapter shape (an incoming adapter's shape wins). The score head is always trained.")
    data: RewardData = field(default_factory=RewardData, help="Preference datasets and how they are tokenized.")
    training: TrainingConfig = field(default_factory=TrainingConfig, help="Optimisation and output settings.")
    center_rewards_coefficient: float | None = field(
        None, help="Weight of the mean((r_chosen + r_rejected)^2) penalty that keeps rewards centred on 0 "
                   "(TRL; 0.01 is the usual value). None: off.")
    disable_dropout: bool = field(True, help="Train without dropout (LoRA's included) for steadier rewards; restored afterwards.")

    def __post_init__(self):
        check_trl_args(self.training.trl_args, "trl:RewardConfig")
        if not self.data.datasets:
            raise ConfigError("at least one training dataset is needed", field="data.datasets")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError("must be zero or positive, or null", field="center_rewards_coefficient")


@borrows_base
def run(config: RewardConfig, base: Base, adapter: str | Path | None = None) -> Path:
    """Train a reward adapter + score head on ``base`` (starting from ``adapter`` if given); return the output directory."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    training, data = config.training, config.data
    output = StageOutput(training.output_dir, stage="rm", resume=training.resume,
                         restart=training.restart)

    # ---- data: load, validate, mix, split, tokenize each side as one conversation ---------------
    started = time.time()
    mixture = load_mixture(data.datasets, kind="preference", seed=training.seed, eval_ratio=data.eval_ratio,
                           eval_specs=data.eval_datasets or None, skip_invalid=data.skip_invalid)
    with_margin = data.use_margin and any(r.get("margin") is not None for r in mixture.train)
    tokenize = dict(max_length=data.max_length, truncation_side=data.truncation_side, with_margin=with_margin)
    train_columns, train_report = tokenize_pairs(base.tokenizer, mixture.train, **tokenize)
    eval_columns, eval_report = tokenize_pairs(base.tokenizer, mixture.eval, **tokenize)
    if not train_columns[compat.CHOSEN_IDS]:
        raise DataError("no training pair is left after tokenization", hint=f"dropped: {dict(train_report.dropped)}")
    train_dataset = Dataset.from_dict(train_columns)
    eval_dataset = Dataset.from_dict(eval_columns) if eval_columns[compat.CHOSEN_IDS] else None
    output.mark("data", started)

    # ---- model: score head on the shared backbone, LoRA adapter (+ head) on top -----------------
    check_bare(base)
    set_seed(training.seed)  # the head's initialisation
    model, init_report = attach_reward_adapter(sequence_classifier(base.model, base.tokenizer), config.lora,
                                               init_from=adapter)
    try:
        with _dropout_off(model, enabled=config.disable_dropout):
            # ---- train --------------------------------------------------------------------------
            args = trainer_args(
                TRLRewardConfig, training, base, output.work_dir, has_eval=eval_dataset is not None,
                # Truncation already happened above (and was counted); TRL would drop long pairs instead.
                max_length=None, center_rewards_coefficient=config.center_rewards_coefficient,
                disable_dropout=False,  # _dropout_off does it, and puts the shared backbone's dropout back
            )
            trainer_class = RewardTrainer if data.padding_free is False else compat.packed_reward_trainer()
            trainer = quiet_trainer(trainer_class(
                model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                processing_class=base.tokenizer,
                callbacks=callbacks(training, has_eval=eval_dataset is not None, title="rm")))
            batching = report_batching("rm", data.padding_free, trainer)
            result = fit(trainer, output, training)

            # ---- evaluate -----------------------------------------------------------------------
            started = time.time()
            metrics: dict[str, Any] = {"batching": batching, "train_loss": result.training_loss,
                                       "train_runtime_s": result.metrics.get("train_runtime"),
                                       "steps": trainer.state.global_step}
            if eval_dataset is not None:
                # One scoring pass gives TRL's eval loss and the metrics below (trainer.evaluate() would be a second).
                chosen = score_ids(model, eval_columns[compat.CHOSEN_IDS], batch_size=training.batch_size)
                rejected = score_ids(model, eval_columns[compat.REJECTED_IDS], batch_size=training.batch_size)
                metrics["eval_loss"] = eval_loss(chosen, rejected, eval_columns.get("margin"),
                                                 center_coefficient=config.center_rewards_coefficient)
                metrics.update(pair_metrics(chosen, rejected, prefix="eval_"))
        trainable, total = trainable_parameters(model)
        metrics.update(trainable_parameters=trainable, total_parameters=total, init_from=init_report,
                       data={"train": train_report.summary(), "eval": eval_report.summary(),
                             "datasets": mixture.report})
        output.mark("evaluate", started)

        # ---- save -----------------------------------------------------------------------------
        if is_main_process():
            model.save_pretrained(output.staging, safe_serialization=True)
            base.tokenizer.save_pretrained(output.staging)
            output.write_json("metrics.json", {**metrics, "log_history": trainer.state.log_history})
            output.commit(config=config, base=base, data_hashes=mixture.data_hashes, metrics=metrics)
        trainer.accelerator.wait_for_everyone()
    finally:
        detach_reward_adapter(model)
    return output.output_dir


# ----------------------------------------------------------------------------------------------
# evaluation: pair loss and accuracy from the scores
# ----------------------------------------------------------------------------------------------

def eval_loss(chosen: Sequence[float], rejected: Sequence[float], margins: Sequence[float] | None = None, *,
              center_coefficient: float | None = None) -> float:
    """TRL's reward loss over all pairs (``stages.core.preference.losses.reward_pair_loss``)."""
    import torch

    return float(reward_pair_loss(torch.tensor(chosen), torch.tensor(rejected),
                                  torch.tensor(margins) if margins else None, center_coefficient))


def pair_metrics(chosen: Sequence[float], rejected: Sequence[float], *, prefix: str = "") -> dict[str, float]:
    """Accuracy (chosen scored strictly above rejected), mean margin, and each side's score distribution."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    metrics = {f"{prefix}pairs": len(margins),
               f"{prefix}accuracy": sum(m > 0 for m in margins) / len(margins),
               f"{prefix}margin_mean": statistics.fmean(margins)}
    for side, values in (("chosen", chosen), ("rejected", rejected)):
        metrics.update({f"{prefix}{side}_score_mean": statistics.fmean(values),
                        f"{prefix}{side}_score_std": statistics.pstdev(values),
                        f"{prefix}{side}_score_min": min(values), f"{prefix}{side}_score_max": max(values)})
    return metrics


# ----------------------------------------------------------------------------------------------
# tokenizing preference pairs
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PairReport:
    pairs: int = 0
    kept: int = 0
    truncated: int = 0  # pairs with at least one side cut to max_length
    dropped: Counter = dataclasses.field(default_factory=Counter)
    tokens: int = 0
    lengths: list[int] = dataclasses.field(default_factory=list)  # the longer side of each kept pair

    def summary(self) -> dict:
        lengths = sorted(self.lengths) or [0]
        return {"pairs": self.pairs, "kept": self.kept, "truncated": self.truncated, "dropped": dict(self.dropped),
                "tokens": self.tokens, "length_mean": round(sum(lengths) / len(lengths), 1),
                "length_max": lengths[-1], "length_p95": lengths[int(0.95 * (len(lengths) - 1))]}


def tokenize_pairs(tokenizer, records: Sequence[dict], *, max_length: int | None, truncation_side: str = "left",
                   with_margin: bool = False) -> tuple[dict, PairReport]:
    """Columns ``chosen_ids``/``rejected_ids`` (+ ``margin``) for TRL's RewardTrainer.

    Each side is the prompt and its reply rendered as one conversation. Pairs that tokenize to the same ids
    (before or after truncation) cannot teach anything and are dropped, counted by reason.
    """
    report = PairReport()
    columns: dict[str, list] = {compat.CHOSEN_IDS: [], compat.REJECTED_IDS: []}
    if with_margin:
        columns["margin"] = []
    for record in records:
        report.pairs += 1
        sides = []
        for name in ("chosen", "rejected"):
            try:
                sides.append(conversation_ids(tokenizer, record["prompt"] + record[name]))
            except LorelayError as err:
                file, line = _where(record)
                raise DataError(err.reason, file=file, line=line, field=name, hint=err.hint) from None
        chosen, rejected = sides
        if chosen == rejected:
            report.dropped["chosen and rejected tokenize identically"] += 1
            continue
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            report.truncated += 1
            keep = slice(None, max_length) if truncation_side == "right" else slice(-max_length, None)
            chosen, rejected = chosen[keep], rejected[keep]
            if chosen == rejected:
                report.dropped["identical after truncation"] += 1
                continue
        columns[compat.CHOSEN_IDS].append(chosen)
        columns[compat.REJECTED_IDS].append(rejected)
        if with_margin:
            columns["margin"].append(float(record.get("margin") or 0.0))
        report.kept += 1
        report.tokens += len(chosen) + len(rejected)
        report.lengths.append(max(len(chosen), len(rejected)))
    return columns, report


def _where(record: dict) -> tuple[str | None, int | None]:
    source = record.get("source") or ""
    file, _, line = source.rpartition(":")
    return (file, int(line)) if line.isdigit() else (source or None, None)


@contextlib.contextmanager
def _dropout_off(model, *, enabled: bool):
    import torch

    modules = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)] if enabled else []
    saved = [m.p for m in modules]
    for module in modules:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in zip(modules, saved):
            module.p = p


def preflight(config: RewardConfig, skip=lambda path: False) -> None:
    """The first rows of every dataset, read as run() reads them (``lorelay run`` checks before loading)."""
    sample_stage_data(config.data, "preference", skip=skip)


STAGE = Stage(
    name="rm", config_class=RewardConfig, run=run,
    description="Train a reward model (LoRA + score head).",
    produces_policy=False,
    produces_reward_model=True,
    headline=(Metric("eval_loss", "eval loss"), Metric("eval_accuracy", "RM acc", "{:.1%}")),
    card_tags=("reward-model",),
    metrics=(*FIT_METRICS, "eval_loss", "eval_pairs", "eval_accuracy", "eval_margin_mean",
             "eval_chosen_score_*", "eval_rejected_score_*"),
    preflight=preflight,
)
