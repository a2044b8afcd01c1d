"""Reward model: TRL's RewardTrainer over a LoRA adapter and a scalar score head on the shared base.

This recipe supports:
- preference data in every form ``stages.core.data`` reads: explicit prompt (``prompt``/``chosen``/``rejected``
  as strings or message lists) and implicit prompt (two whole conversations sharing a prefix), with an
  optional ``margin`` (or ``score_chosen``/``score_rejected``) that enters the loss as
  ``-log sigmoid(r_chosen - r_rejected - margin)``;
- one set of base weights: the classifier is ``stages.core.modeling.sequence_classifier`` (a score head on the
  very backbone modules of the causal LM), wrapped in a LoRA adapter whose ``modules_to_save`` holds the
  head, so adapter and head are trained and saved together;
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

Shared APIs (docs/architecture.md): ``score`` and ``reward_model``, used by DPO for win rates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from stages.core.config import field
from stages.core.data import DatasetSpec, load_mixture
from stages.core.data.sample import sample_records
from stages.core.errors import ConfigError, DataError, LorelayError
from stages.core.lifecycle import borrow, borrows_base
from stages.core.modeling import (Base, LoraSettings, ModelConfig, attach_adapter, detach_adapter,
                             sequence_classifier, settings_from_adapter)
from stages.core.stage import Metric, Stage
from stages.core.training import (StageOutput, TrainingConfig, callbacks, fit, is_main_process, quiet_trainer,
                             trainable_parameters, trainer_args)

SCORE_HEAD = "score"  # the head's attribute on transformers' *ForSequenceClassification models


@dataclasses.dataclass
class RewardData:
    datasets: list[DatasetSpec] = field(default_factory=list, help="Preference datasets, mixed by weight or sample count.")
    eval_datasets: list[DatasetSpec] = field(default_factory=list, help="Held-out preference datasets; when empty, eval_ratio splits the training mix.")
    eval_ratio: float = field(0.05, help="Fraction of the training mix held out for evaluation (seeded).")
    max_length: int | None = field(1024, help="Longer conversations are truncated (and counted); None keeps all.")
    truncation_side: Literal["left", "right"] = field(
        "left", help="left keeps the end of a long conversation, where its score is read; right keeps its start.")
    use_margin: bool = field(True, help="Put each pair's margin (when the data has one) into the loss.")
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
    if not train_columns["chosen_ids"]:
        raise DataError("no training pair is left after tokenization", hint=f"dropped: {dict(train_report.dropped)}")
    train_dataset = Dataset.from_dict(train_columns)
    eval_dataset = Dataset.from_dict(eval_columns) if eval_columns["chosen_ids"] else None
    output.mark("data", started)

    # ---- model: score head on the shared backbone, LoRA adapter (+ head) on top -----------------
    _check_bare(base)
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
            trainer = quiet_trainer(RewardTrainer(
                model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                processing_class=base.tokenizer,
                callbacks=callbacks(training, has_eval=eval_dataset is not None, title="rm")))
            result = fit(trainer, output, training)

            # ---- evaluate -----------------------------------------------------------------------
            started = time.time()
            metrics: dict[str, Any] = {"train_loss": result.training_loss,
                                       "train_runtime_s": result.metrics.get("train_runtime"),
                                       "steps": trainer.state.global_step}
            if eval_dataset is not None:
                # One scoring pass gives TRL's eval loss and the metrics below (trainer.evaluate() would be a second).
                chosen = _score_ids(model, eval_columns["chosen_ids"], batch_size=training.batch_size)
                rejected = _score_ids(model, eval_columns["rejected_ids"], batch_size=training.batch_size)
                metrics["eval_loss"] = pair_loss(chosen, rejected, eval_columns.get("margin"),
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
# scoring: the shared API
# ----------------------------------------------------------------------------------------------

def score(model, tokenizer, conversations: list[list[dict]], *, batch_size: int = 8) -> list[float]:
    """Scalar scores of whole conversations (message lists ending with an assistant turn).

    Each conversation is rendered with the chat template and scored at its last token; batches are
    right-padded with an attention mask, so a score does not depend on the batch it was computed in
    (beyond float rounding: ~1e-6 in float32 on CPU, from kernels that differ with the batch shape).
    The model is put in eval mode for the call and back in its previous mode afterwards.
    """
    sequences = []
    for index, messages in enumerate(conversations):
        try:
            sequences.append(conversation_ids(tokenizer, messages))
        except LorelayError as err:
            raise LorelayError(f"conversation {index}: {err.reason}", hint=err.hint) from None
    return _score_ids(model, sequences, batch_size=batch_size)


@contextlib.contextmanager
def reward_model(base: Base, rm_dir: str | Path) -> Iterator[Any]:
    """Put the reward adapter + score head saved in ``rm_dir`` on the shared base; yield the scoring model.

    The model is in eval mode with nothing trainable. The base is borrowed (``stages.core.lifecycle.borrow``):
    on exit it is exactly as before.
    """
    rm_dir = Path(rm_dir)
    if not (rm_dir / "adapter_config.json").exists():
        raise LorelayError("not a reward model directory (no adapter_config.json)", file=rm_dir)
    _check_bare(base)
    with borrow(base, rm_dir):
        model, _ = attach_reward_adapter(sequence_classifier(base.model, base.tokenizer), LoraSettings(),
                                         init_from=rm_dir, require_head=True)
        try:
            model.eval()
            for param in model.parameters():
                param.requires_grad_(False)
            yield model
        finally:
            detach_reward_adapter(model)


def conversation_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a whole conversation rendered with the chat template (no generation prompt)."""
    import jinja2

    messages = list(messages)
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise LorelayError("a conversation to score must end with an assistant reply")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except (jinja2.TemplateError, TypeError, ValueError) as err:
        raise LorelayError(f"the chat template refuses this conversation: {err}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _score_ids(model, sequences: Sequence[Sequence[int]], *, batch_size: int) -> list[float]:
    import torch

    if batch_size < 1:
        raise LorelayError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = model.config.get_text_config().pad_token_id
    if pad_id is None:
        raise LorelayError("the reward model has no pad_token_id, so batches cannot be padded",
                           hint="set tokenizer.pad_token before building the model")
    if any(len(ids) == 0 for ids in sequences):
        raise LorelayError("cannot score an empty token sequence")
    device = next(model.parameters()).device
    # Similar lengths together: less padding. Scores go back to the caller's order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(sequences[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, index in enumerate(rows):
                    length = len(sequences[index])
                    input_ids[row, :length] = torch.tensor(sequences[index], dtype=torch.long)
                    attention_mask[row, :length] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               use_cache=False).logits
                for row, index in enumerate(rows):
                    scores[index] = float(logits[row, 0])
    finally:
        model.train(was_training)
    return scores


def pair_loss(chosen: Sequence[float], rejected: Sequence[float], margins: Sequence[float] | None = None, *,
              center_coefficient: float | None = None) -> float:
    """TRL's reward loss over all pairs: mean -log sigmoid(r_c - r_r - margin) (+ centring penalty)."""
    margins = margins or [0.0] * len(chosen)
    # -log sigmoid(x) = softplus(-x), written to stay finite for large |x|
    losses = [max(-x, 0.0) + math.log1p(math.exp(-abs(x))) for x in
              (c - r - m for c, r, m in zip(chosen, rejected, margins))]
    loss = sum(losses) / len(losses)
    if center_coefficient is not None:
        loss += center_coefficient * sum((c + r) ** 2 for c, r in zip(chosen, rejected)) / len(chosen)
    return loss


def pair_metrics(chosen: Sequence[float], rejected: Sequence[float], *, prefix: str = "") -> dict[str, float]:
    """Accuracy (chosen scored strictly above rejected), mean margin, and each side's score distribution."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    metrics = {f"{prefix}pairs": len(margins),
               f"{prefix}accuracy": sum(m > 0 for m in margins) / len(margins),
               f"{prefix}margin_mean": sum(margins) / len(margins)}
    for side, values in (("chosen", chosen), ("rejected", rejected)):
        mean = sum(values) / len(values)
        metrics.update({f"{prefix}{side}_score_mean": mean,
                        f"{prefix}{side}_score_std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
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
    columns: dict[str, list] = {"chosen_ids": [], "rejected_ids": []}
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
        columns["chosen_ids"].append(chosen)
        columns["rejected_ids"].append(rejected)
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


# ----------------------------------------------------------------------------------------------
# the reward adapter on the shared backbone
# ----------------------------------------------------------------------------------------------

def attach_reward_adapter(classifier, lora: LoraSettings, *, init_from: str | Path | None = None,
                          require_head: bool = False) -> tuple[Any, dict | None]:
    """A trainable seq-cls LoRA adapter (+ score head in ``modules_to_save``) on ``classifier``.

    ``init_from`` may be a causal adapter (SFT, CPT) or a saved reward adapter. A causal adapter's LoRA
    weights are mapped onto the classifier (key prefixes translated); its weights for modules the classifier
    lacks (``lm_head``) are left out and listed; the score head keeps its fresh initialisation unless the
    adapter has one. ``require_head`` refuses an adapter without a score head (loading a finished RM).
    Returns the PEFT model and, with ``init_from``, what was loaded and what was left out.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if init_from is None:
        return attach_adapter(classifier, lora, task="seq_cls", extra_modules_to_save=[SCORE_HEAD]), None

    # The incoming shape wins; names that exist only on a causal LM (lm_head) have no place here.
    settings = settings_from_adapter(init_from)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in classifier.named_modules()}
    settings.modules_to_save = [m for m in settings.modules_to_save if m in leaf_names]
    if isinstance(settings.target_modules, list):
        settings.target_modules = [m for m in settings.target_modules if m.rsplit(".", 1)[-1] in leaf_names]
    model = attach_adapter(classifier, settings, task="seq_cls", extra_modules_to_save=[SCORE_HEAD])

    expected = get_peft_model_state_dict(model)  # keys as saved: no adapter name
    saved = load_peft_weights(str(init_from), device=str(next(classifier.parameters()).device))
    weights = {_classifier_key(key, classifier, expected): value for key, value in saved.items()}
    left_out = sorted(key for key in weights if key not in expected)
    weights = {key: value for key, value in weights.items() if key in expected}
    missing = [key for key in expected if key not in weights]
    missing_lora = [key for key in missing if "lora_" in key]
    if missing_lora:
        detach_reward_adapter(model)
        raise LorelayError(f"adapter does not fit this base model ({len(missing_lora)} LoRA weights missing, "
                           f"e.g. {missing_lora[0]})", file=init_from)
    head_missing = [key for key in missing if f".{SCORE_HEAD}." in key]
    if require_head and head_missing:
        detach_reward_adapter(model)
        raise LorelayError("not a reward model: the adapter has no score head", file=init_from,
                           hint="train one with `lorelay rm`")
    # PEFT's loader wants every modules_to_save weight: the ones the adapter lacks keep their current values.
    weights.update({key: expected[key] for key in missing})
    set_peft_model_state_dict(model, weights)
    return model, {"path": str(init_from), "loaded": len(weights) - len(missing),
                   "fresh": sorted(missing), "left_out": left_out}


def _classifier_key(key: str, classifier, expected: dict) -> str:
    """``key`` of a causal adapter renamed for ``classifier`` when their backbone attributes differ.

    ``sequence_classifier`` puts the causal LM's backbone under the classifier's ``base_model_prefix``;
    for most architectures both are ``model`` and keys carry over unchanged.
    """
    head = "base_model.model."
    if key in expected or not key.startswith(head):
        return key
    _, _, rest = key[len(head):].partition(".")
    renamed = f"{head}{classifier.base_model_prefix}.{rest}"
    return renamed if renamed in expected else key


def _check_bare(base: Base) -> None:
    """The classifier shares ``base.model``'s modules, so another adapter on them would leak into the RM."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in base.model.modules()):
        raise LorelayError("the shared base still carries an adapter; detach it before building the reward model",
                           hint="call stages.core.modeling.detach_adapter(model) on the stage's PEFT model first")


def detach_reward_adapter(model):
    """Unload the adapter (and the score head, which lives only on the throwaway classifier)."""
    return detach_adapter(model)


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
    if not config.data.datasets:
        raise ConfigError("no datasets given: list at least one", field="data.datasets")
    sample_records([*config.data.datasets, *config.data.eval_datasets], "preference",
                   skip_invalid=config.data.skip_invalid, skip=skip)


STAGE = Stage(
    name="rm", config_class=RewardConfig, run=run,
    description="Train a reward model (LoRA + score head).",
    produces_policy=False,
    produces_reward_model=True,
    headline=(Metric("eval_loss", "eval loss"), Metric("eval_accuracy", "RM acc", "{:.1%}")),
    card_tags=("reward-model",),
    metrics=("train_loss", "train_runtime_s", "steps", "skipped_nonfinite_steps", "trainable_parameters",
             "total_parameters", "eval_loss", "eval_pairs", "eval_accuracy", "eval_margin_mean",
             "eval_chosen_score_*", "eval_rejected_score_*"),
    preflight=preflight,
)
