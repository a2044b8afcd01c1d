"""Preference optimisation from an SFT adapter: DPO, ORPO or KTO on the shared base, judged by a reward model.

This recipe supports:
- ``method: dpo``: TRL's DPOTrainer with every loss its DPOConfig offers (``sigmoid``, ``ipo``, ``robust``,
  ``apo_zero``, ...), alone or as a weighted sum (``loss_type: [sigmoid, bco_pair, sft]`` with
  ``loss_weights: [0.8, 0.2, 1.0]`` is MPO; ``[sigmoid, sft]`` is RPO);
- ``method: orpo``: TRL's ORPOTrainer (``trl.experimental.orpo``): SFT loss plus an odds-ratio term, no reference;
- ``method: kto``: TRL's KTOTrainer on unpaired desirable/undesirable completions (``format: kto`` rows), or on
  pairs split into one of each (declare ``format: preference`` on every dataset);
- a reference policy without a second copy of the base. Continuing an incoming adapter, TRL adds a frozen copy
  of it named ``ref`` next to the trained ``default`` adapter and switches to it for the reference forward; with no
  incoming adapter the reference is the base with adapters disabled. Both live on the one shared base;
- win rate: the trained policy against the reference, greedy replies to held-out prompts judged by a reward-model
  stage directory (``reward_model``), when one is given and exists.

Assumptions: the base is shared with other stages (a ``Base`` from ``stages.core.modeling.load_base``) and comes back
bare; the incoming adapter (``adapter=``) is a LoRA adapter of that base, e.g. the SFT stage's output.

Raises: ``ConfigError`` for settings that do not combine (checked before anything loads), ``DataError`` naming
file:line for a malformed pair, or when no pair survives ``data.max_length``.

Output directory: the trained policy adapter only (never the ``ref`` copy), tokenizer with chat template,
metrics.json (final eval reward accuracy, margins and log-probs, train history, win rate), samples.json (the
policy's and the reference's replies to the held-out prompts, with their reward scores), manifest.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from stages.core.compat import packed_dpo_trainer
from stages.core.preference.dpo_step import report_batching
from stages.core.config import field
from stages.core.data import DatasetSpec, Mixture, data_hash, load_mixture, read_rows
from stages.core.data.sample import SAMPLE_ROWS, sample_records
from stages.core.errors import ConfigError, DataError, did_you_mean
from stages.core.evaluation import generate
from stages.core.lifecycle import borrows_base
from stages.core.modeling import Base, LoraSettings, ModelConfig, attach_adapter, detach_adapter
from stages.core.stage import Metric, Stage
from stages.core.training import (StageOutput, TrainingConfig, callbacks, fit, is_main_process, quiet_trainer,
                             seed_everything, trainable_parameters, trainer_args)

Method = Literal["dpo", "orpo", "kto"]

# TRL 1.16's DPOConfig.loss_type options (trl/trainer/dpo_config.py) and KTOConfig.loss_type options.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")

# TRL's logged metric -> our name in metrics.json (prefixed eval_ / train_).
HEADLINE = {
    "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
    "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
    "kl": "kl", "nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio",
}


@dataclasses.dataclass
class PreferenceData:
    datasets: list[DatasetSpec] = field(
        default_factory=list, help="Training datasets (pairs; KTO rows for method kto), mixed by weight or count.")
    eval_datasets: list[DatasetSpec] = field(
        default_factory=list, help="Held-out datasets; when empty, eval_ratio splits the training mix.")
    eval_ratio: float = field(0.05, help="Fraction of the training mix held out for evaluation (seeded).")
    max_length: int | None = field(
        1024, help="Prompt + reply tokens kept: the reply's end is cut, pairs whose prompt alone fills it are "
                   "dropped (both counted). TRL 1.16 has no separate prompt/completion limits for DPO.")
    padding_free: bool | None = field(
        None, help="dpo: lorelay's packed rows (no padding, each prompt once, LM head on replies only; "
                   "stages/core/preference). null: on wherever the loss and attention kernel allow it, else "
                   "TRL's padded batches with the reason printed; true: refuse to pad. orpo/kto: TRL's padded "
                   "batches (the packed rows are wired for dpo only), so true is refused.")
    skip_invalid: bool = field(False, help="Skip malformed rows (counted in metrics) instead of stopping.")

    def __post_init__(self):
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="eval_ratio")
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError("must be at least 8 tokens, or null for no limit", field="max_length")


@dataclasses.dataclass
class DPOTraining(TrainingConfig):
    # Defaults that differ from TrainingConfig (the SFT defaults): preference tuning nudges a trained adapter.
    output_dir: Path = field(Path("outputs/dpo"), help="Where the finished stage is written (atomically).")
    batch_size: int = field(4, help="Pairs per device per micro-batch (each pair is two sequences).")
    gradient_accumulation_steps: int = field(
        2, help="Micro-batches per optimizer step. Global batch = batch_size x accumulation x processes pairs.")
    learning_rate: float = field(
        5e-5, help="Peak learning rate: 5e-5..1e-4 suits LoRA DPO (TRL's default 1e-6 is for full fine-tuning).")
    warmup_ratio: float = field(0.1, help="Fraction of steps spent warming up linearly from 0.")


@dataclasses.dataclass
class DPOConfig:
    model: ModelConfig = field(
        default_factory=ModelConfig, help="Base model (ignored inside a pipeline, which shares its base).")
    lora: LoraSettings = field(
        default_factory=LoraSettings, help="Adapter shape without an incoming adapter (an incoming one's shape wins).")
    data: PreferenceData = field(default_factory=PreferenceData, help="Preference datasets and lengths.")
    training: DPOTraining = field(default_factory=DPOTraining, help="Optimisation and output settings.")
    method: Method = field(
        "dpo", help="dpo (against a frozen reference), orpo (no reference) or kto (unpaired good/bad labels).")
    beta: float = field(
        0.1, help="dpo/kto: how far the policy may move from the reference (higher: less); ipo: tau; "
                  "orpo: lambda, the weight of the odds-ratio term.")
    loss_type: str | list[str] | None = field(
        None, help=f"dpo: one of {', '.join(DPO_LOSSES)}, or a list of them summed with loss_weights "
                   f"(default sigmoid). kto: {' or '.join(KTO_LOSSES)} (default kto). orpo: not used.")
    loss_weights: list[float] | None = field(None, help="dpo: weight of each loss in loss_type (default 1.0 each).")
    rpo_alpha: float | None = field(
        None, help="dpo: weight of an SFT (negative log-likelihood) term on the chosen replies, added to the "
                   "preference loss (RPO): it keeps the policy's likelihood of the right answers from falling. "
                   "TRL 1.16 spells it as an extra `sft` loss; this key appends it with this weight.")
    label_smoothing: float = field(
        0.0, help="dpo robust: probability a label is flipped, in [0, 0.5); exo_pair: epsilon (> 0, e.g. 1e-3).")
    precompute_ref_log_probs: bool | None = field(
        None, help="dpo/kto: compute the frozen reference's log-probs of all data in one pass before training "
                   "(cached with TRL's dataset cache) instead of in every step. null: on when training passes over "
                   "the data more than once (training.epochs > 1), where it saves a reference forward per pass.")
    desirable_weight: float = field(
        1.0, help="kto: weight of the desirable examples' loss (raise it when they are fewer).")
    undesirable_weight: float = field(1.0, help="kto: weight of the undesirable examples' loss.")
    reward_model: Path | None = field(
        None, help="Reward-model stage directory that judges policy against reference replies (win rate); "
                   "skipped with a message when it does not exist.")
    win_rate_prompts: DatasetSpec | Path | None = field(
        None, help="Held-out prompts for the win rate and samples.json: rows with a `prompt` string (or message "
                   "list) or `messages` ending in a user turn. Default: the eval pairs' prompts.")
    win_rate_samples: int = field(32, help="Prompts judged for the win rate (the first N).")
    win_rate_tie_margin: float = field(
        0.0, help="Reward differences at most this large count as ties (identical replies always do).")
    sample_prompts: int = field(
        4, help="Prompts answered by policy and reference for samples.json when there is no reward model.")
    max_new_tokens: int = field(64, help="Length limit of the greedy replies (win rate and samples).")
    generation_batch_size: int = field(8, help="Prompts per generation and scoring batch.")

    def __post_init__(self):
        if not self.data.datasets:
            raise ConfigError("at least one training dataset is needed", field="data.datasets")
        if self.beta <= 0:
            raise ConfigError("must be positive", field="beta")
        if isinstance(self.win_rate_prompts, (str, Path)):
            self.win_rate_prompts = DatasetSpec(path=str(self.win_rate_prompts))
        for name in ("win_rate_samples", "sample_prompts", "max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)
        if self.win_rate_tie_margin < 0:
            raise ConfigError("must be zero or positive", field="win_rate_tie_margin")
        if self.data.padding_free and self.method != "dpo":
            raise ConfigError(f"{self.method.upper()} runs TRL's padded batches: lorelay's packed rows are wired for "
                              "dpo only (set data.padding_free: false or null)", field="data.padding_free")
        self._check_formats()
        {"dpo": self._check_dpo, "orpo": self._check_orpo, "kto": self._check_kto}[self.method]()

    def _check_formats(self) -> None:
        """The data a method trains on: pairs for dpo/orpo; KTO rows, or pairs declared as such, for kto."""
        declared = {spec.format for spec in [*self.data.datasets, *self.data.eval_datasets]} - {"auto"}
        usable = ("kto", "preference") if self.method == "kto" else ("preference",)
        for fmt in sorted(declared - set(usable)):
            hint = "; use method: kto for unpaired (prompt, completion, label) rows" if fmt == "kto" else ""
            raise ConfigError(f"{self.method} trains on {' or '.join(usable)} data, not '{fmt}'{hint}",
                              field="data.datasets")
        if self.method == "kto" and "preference" in declared:
            specs = [*self.data.datasets, *self.data.eval_datasets]
            if any(spec.format != "preference" for spec in specs):
                raise ConfigError("kto reads either KTO rows or pairs in one run: declare format: preference on "
                                  "every dataset (pairs are split into a desirable and an undesirable example), "
                                  "or on none", field="data.datasets")

    def _check_dpo(self) -> None:
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type or ["sigmoid"])
        if not losses:
            raise ConfigError("name at least one loss", field="loss_type")
        for loss in losses:
            if loss not in DPO_LOSSES:
                raise ConfigError(f"unknown DPO loss '{loss}'{_suggest(loss, DPO_LOSSES)}; expected one of "
                                  f"{', '.join(DPO_LOSSES)}", field="loss_type")
        if len(set(losses)) != len(losses):
            raise ConfigError("a loss is listed twice; give it a larger weight instead", field="loss_type")
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ConfigError(f"{len(self.loss_weights)} weights for {len(losses)} loss types: give one weight "
                              "per loss", field="loss_weights")
        if self.rpo_alpha is not None:
            if self.rpo_alpha <= 0:
                raise ConfigError("must be positive (or null for no SFT term)", field="rpo_alpha")
            if "sft" in losses:
                raise ConfigError("loss_type already has an sft term: give its weight in loss_weights, or drop it "
                                  "from loss_type and keep rpo_alpha", field="rpo_alpha")
            self.loss_weights = [*(self.loss_weights or [1.0] * len(losses)), self.rpo_alpha]
            losses.append("sft")
            self.rpo_alpha = None  # folded into loss_type/loss_weights: validating the result again is a no-op
        if "exo_pair" in losses and self.label_smoothing <= 0:
            raise ConfigError("exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)", field="label_smoothing")
        if "robust" in losses and not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("robust DPO reads it as a flip probability: must be in [0, 0.5)", field="label_smoothing")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("must be in [0, 1)", field="label_smoothing")
        self.loss_type = losses

    def _check_orpo(self) -> None:
        for name, default in (("loss_type", None), ("loss_weights", None), ("rpo_alpha", None),
                              ("label_smoothing", 0.0), ("precompute_ref_log_probs", None)):
            if getattr(self, name) != default:
                raise ConfigError("ORPO has no reference model and one fixed loss: this key does not apply "
                                  "(remove it, or use method: dpo)", field=name)

    def _check_kto(self) -> None:
        loss = self.loss_type or "kto"
        if not isinstance(loss, str) or loss not in KTO_LOSSES:
            shown = loss if isinstance(loss, str) else loss[0] if len(loss) == 1 else loss
            raise ConfigError(f"KTO's loss is one of {', '.join(KTO_LOSSES)}, got {shown!r}"
                              f"{_suggest(str(shown), KTO_LOSSES)}", field="loss_type")
        for name in ("loss_weights", "rpo_alpha"):
            if getattr(self, name) is not None:
                raise ConfigError("KTO has one loss; weigh its two sides with desirable_weight/undesirable_weight",
                                  field=name)
        if self.label_smoothing != 0.0:
            raise ConfigError("KTO has no label smoothing", field="label_smoothing")
        if min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise ConfigError("must be positive", field="desirable_weight")
        if loss == "kto" and self.training.batch_size < 2:
            raise ConfigError("the KTO loss estimates its KL term from the other examples of a micro-batch: "
                              "batch_size must be at least 2 (or use loss_type: apo_zero_unpaired)",
                              field="training.batch_size")
        self.loss_type = loss


def _suggest(name: str, choices) -> str:
    # In the message itself: load_config keeps an error's message and field when it re-raises, not its hint.
    guess = did_you_mean(name, choices)
    return f" ({guess})" if guess else ""


# ----------------------------------------------------------------------------------------------
# the methods: which TRL trainer, which config, which data, and the arguments only it takes
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MethodSpec:
    trainer: str                                  # "module:Class"
    args: str                                     # "module:Class" of its TRL config
    reference: bool                               # trains against a frozen reference policy
    stage_args: Callable[[DPOConfig], dict[str, Any]]

    def classes(self):
        return tuple(getattr(importlib.import_module(path.partition(":")[0]), path.partition(":")[2])
                     for path in (self.trainer, self.args))


METHODS: dict[str, MethodSpec] = {
    "dpo": MethodSpec("trl:DPOTrainer", "trl:DPOConfig", reference=True, stage_args=lambda c: dict(
        beta=c.beta, loss_type=c.loss_type, loss_weights=c.loss_weights, label_smoothing=c.label_smoothing,
        precompute_ref_log_probs=precompute_reference(c), max_length=c.data.max_length)),
    "orpo": MethodSpec("trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig", reference=False,
                       stage_args=lambda c: dict(beta=c.beta, max_length=c.data.max_length)),
    "kto": MethodSpec("trl:KTOTrainer", "trl:KTOConfig", reference=True, stage_args=lambda c: dict(
        beta=c.beta, loss_type=c.loss_type, desirable_weight=c.desirable_weight,
        undesirable_weight=c.undesirable_weight, precompute_ref_log_probs=precompute_reference(c),
        max_length=c.data.max_length)),
}


def precompute_reference(config: DPOConfig) -> bool:
    """Reference log-probs in one pass before training: as configured, else when the data is seen twice or more."""
    if config.precompute_ref_log_probs is not None:
        return config.precompute_ref_log_probs
    return config.training.max_steps <= 0 and config.training.epochs > 1


@borrows_base
def run(config: DPOConfig, base: Base, adapter: str | Path | None = None) -> Path:
    """Train a preference adapter on ``base`` from ``adapter`` (or a fresh one); return the output directory."""
    from datasets import Dataset

    training, data = config.training, config.data
    method = METHODS[config.method]
    output = StageOutput(training.output_dir, stage="dpo", resume=training.resume,
                         restart=training.restart)
    judge_dir = _reward_model_dir(config)

    # ---- data: load, validate, mix, split; held-out prompts for the win rate --------------------
    started = time.time()
    mixture = load_preferences(config)
    train_dataset = Dataset.from_list([trainer_row(r) for r in mixture.train])
    eval_dataset = Dataset.from_list([trainer_row(r) for r in mixture.eval]) if mixture.eval else None
    prompts = held_out_prompts(config, mixture, count=config.win_rate_samples if judge_dir else config.sample_prompts)
    output.mark("data", started)

    # ---- model: the incoming adapter, trainable, on the shared base --------------------------------
    seed_everything(config.training.seed)  # the LoRA initialisation follows training.seed
    model = attach_adapter(base.model, config.lora, init_from=adapter,
                           allow_pickle_weights=base.config.allow_pickle_weights)
    try:
        # Reference replies before training only when nothing keeps the starting point (ORPO from an adapter).
        reference_replies = _generate(config, model, base, prompts) if not method.reference and adapter else None

        # ---- train --------------------------------------------------------------------------------
        trainer_class, args_class = method.classes()
        if config.method == "dpo" and data.padding_free is not False:
            trainer_class = packed_dpo_trainer()
        args = trainer_args(args_class, training, base, output.work_dir, has_eval=eval_dataset is not None,
                            **method.stage_args(config))
        trainer = quiet_trainer(trainer_class(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=base.tokenizer,
            callbacks=callbacks(training, has_eval=eval_dataset is not None, title=config.method)))
        batching = report_batching(config.method, data.padding_free, trainer)
        reference = settle_reference(model, method, adapter)
        # KTO splits each pair it is given into a desirable and an undesirable example.
        per_record = 2 if config.method == "kto" and "chosen" in train_dataset.column_names else 1
        length_report = {
            "train": _length_report(trainer.train_dataset, per_record * len(mixture.train), data.max_length),
            "eval": _length_report(trainer.eval_dataset, per_record * len(mixture.eval), data.max_length)}
        if length_report["train"]["used"] == 0:
            raise DataError("no training example is left: every prompt fills data.max_length",
                            field="data.max_length", hint="raise data.max_length")
        result = fit(trainer, output, training)

        # ---- evaluate: TRL's preference metrics on held-out pairs, then ALL generation -----------------
        started = time.time()
        metrics: dict[str, Any] = {"method": config.method, "reference": reference, "batching": batching,
                                   "train_loss": result.training_loss,
                                   "train_runtime_s": result.metrics.get("train_runtime"),
                                   "steps": trainer.state.global_step}
        metrics.update(_final_train_metrics(trainer.state.log_history))
        if eval_dataset is not None:
            metrics.update(_eval_metrics(trainer.evaluate()))
        samples = []
        if is_main_process():
            policy = _generate(config, model, base, prompts)
            if reference_replies is None:
                with reference_policy(model):
                    reference_replies = _generate(config, model, base, prompts)
            samples = [{"prompt": p["messages"][-1]["content"], "source": p["source"], "policy": a, "reference": r}
                       for p, a, r in zip(prompts, policy, reference_replies)]
        trainable, total = trainable_parameters(model)
        metrics.update(trainable_parameters=trainable, total_parameters=total,
                       data={"datasets": mixture.report, "lengths": length_report})
        output.mark("evaluate", started)

        # ---- save the policy adapter (never the frozen "ref" copy) -----------------------------------
        if is_main_process():
            model.save_pretrained(output.staging, safe_serialization=True, selected_adapters=["default"])
            base.tokenizer.save_pretrained(output.staging)
    finally:
        detach_adapter(model)  # also undoes TRL's fused-LM-head patch of the base's forward

    # ---- judge: the DPO adapter is off the base; the reward model goes on it ----------------------
    if is_main_process():
        started = time.time()
        if judge_dir is not None and samples:
            metrics.update(judge(base, judge_dir, prompts, samples, tie_margin=config.win_rate_tie_margin,
                                 batch_size=config.generation_batch_size))
        else:
            metrics["win_rate_skipped"] = _skip_reason(config)
        output.mark("judge", started)
        output.write_json("metrics.json", {**metrics, "train_history": train_history(trainer.state.log_history),
                                           "log_history": trainer.state.log_history})
        output.write_json("samples.json", samples)
        hashes = dict(mixture.data_hashes)
        if config.win_rate_prompts is not None:
            hashes[config.win_rate_prompts.path] = data_hash(config.win_rate_prompts.path)
        output.commit(config=config, base=base, data_hashes=hashes, metrics=metrics,
                      extra={"init_from": str(adapter) if adapter else None,
                             "reward_model": str(judge_dir) if judge_dir else None})
    trainer.accelerator.wait_for_everyone()
    return output.output_dir


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def load_preferences(config: DPOConfig) -> Mixture:
    """Pairs (dpo, orpo, kto on declared pairs) or KTO rows, checked row by row by ``stages.core.data``."""
    data = config.data
    return load_mixture(data.datasets, kind=data_kind(config), seed=config.training.seed,
                        eval_ratio=data.eval_ratio, eval_specs=data.eval_datasets or None,
                        skip_invalid=data.skip_invalid)


def data_kind(config: DPOConfig) -> str:
    """What the rows are: pairs (dpo, orpo, and kto on datasets all declared as pairs) or KTO rows."""
    specs = [*config.data.datasets, *config.data.eval_datasets]
    pairs = config.method != "kto" or all(spec.format == "preference" for spec in specs)
    return "preference" if pairs else "kto"


def trainer_row(record: dict) -> dict:
    """The conversational columns TRL's trainers read (they apply the chat template themselves)."""
    if "label" in record:
        return {"prompt": record["prompt"], "completion": record["completion"], "label": bool(record["label"])}
    return {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]}


def held_out_prompts(config: DPOConfig, mixture: Mixture, *, count: int) -> list[dict]:
    """Prompt conversations (ending in a user turn) for generation: the prompts file, or the eval prompts."""
    prompts: list[dict] = []
    if config.win_rate_prompts is not None:
        for where, row in read_rows(config.win_rate_prompts):
            if isinstance(row, Exception):
                raise row
            prompts.append({"messages": _prompt_messages(row, where), "source": where.source})
            if len(prompts) >= count:
                break
        if not prompts:
            raise DataError("no prompts", file=config.win_rate_prompts.path)
        return prompts
    seen = set()
    for record in mixture.eval:
        key = repr(record["prompt"])
        if key not in seen and record["prompt"][-1]["role"] == "user":
            seen.add(key)
            prompts.append({"messages": record["prompt"], "source": record["source"]})
        if len(prompts) >= count:
            break
    return prompts


def _prompt_messages(row: Any, where) -> list[dict]:
    value = row.get("prompt", row.get("messages")) if isinstance(row, dict) else None
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                  and m.get("role") in ("system", "user", "assistant", "tool")
                                                  for m in value)):
        if value[-1]["role"] != "user":
            raise where.error("prompt", f"the prompt must end with a user turn, not '{value[-1]['role']}'",
                              field="prompt")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise where.error("prompt", "expected a non-empty `prompt` string, or a `prompt`/`messages` list of "
                                "{role, content} messages ending in a user turn", field="prompt")


def _length_report(dataset, examples: int, max_length: int | None) -> dict[str, int | None]:
    """How many examples TRL kept, and how many it will cut at max_length (it drops or cuts silently).

    ``truncated`` is None where the trainer's columns do not show it (ORPO tokenizes and cuts in its own way).
    """
    if dataset is None:
        return {"examples": examples, "used": 0, "dropped_prompt_too_long": 0, "truncated": 0}
    report: dict[str, int | None] = {"examples": examples, "used": len(dataset),
                                     "dropped_prompt_too_long": max(0, examples - len(dataset)), "truncated": None}
    sides = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in dataset.column_names]
    if max_length is None:
        report["truncated"] = 0
    elif "prompt_ids" in dataset.column_names and sides and len(dataset):
        import pyarrow.compute as pc

        table = dataset.select_columns(["prompt_ids", *sides]).with_format("arrow")[:]
        longest = pc.list_value_length(table["prompt_ids"])
        for side in sides:
            longest_side = pc.add(pc.list_value_length(table["prompt_ids"]), pc.list_value_length(table[side]))
            longest = pc.max_element_wise(longest, longest_side)
        report["truncated"] = int(pc.sum(pc.greater(longest, max_length)).as_py() or 0)
    return report


# ----------------------------------------------------------------------------------------------
# generation and judging
# ----------------------------------------------------------------------------------------------

def settle_reference(model, method: MethodSpec, adapter) -> str:
    """What the trainer compares against, in words for metrics.json.

    TRL's DPO/KTO trainers, given a PeftModel and no ref_model, add a frozen copy of its adapter named "ref"
    and switch to it for the reference forward (trl/trainer/dpo_trainer.py). A fresh adapter's copy is the
    base itself (LoRA B starts at zero), so it is dropped: TRL then runs the reference with adapters disabled.
    """
    if method.reference and adapter is None and "ref" in model.peft_config:
        model.delete_adapter("ref")
    if "ref" in model.peft_config:
        return "adapter copy 'ref' (the incoming adapter, frozen)"
    return "base (adapters disabled)" if method.reference else "none (ORPO)"


@contextlib.contextmanager
def reference_policy(model):
    """Make ``model`` the frozen reference TRL trained against: the ``ref`` adapter copy, or the bare base."""
    if "ref" in model.peft_config:
        previous = model.active_adapter
        model.set_adapter("ref", inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(previous)
    else:
        with model.disable_adapter():
            yield model


def _generate(config: DPOConfig, model, base: Base, prompts: list[dict]) -> list[str]:
    if not prompts:
        return []
    replies = generate(model, base.tokenizer, [p["messages"] for p in prompts],
                       max_new_tokens=config.max_new_tokens, batch_size=config.generation_batch_size)
    return [r[0] for r in replies]


def _reward_model_dir(config: DPOConfig) -> Path | None:
    if config.reward_model is None:
        return None
    if not Path(config.reward_model).exists():
        print(f"lorelay: reward model {config.reward_model} not found; the win rate is skipped "
              "(train one with `make rm`, or drop `reward_model`)")
        return None
    return Path(config.reward_model)


def _skip_reason(config: DPOConfig) -> str:
    if config.reward_model is None:
        return "no reward_model configured"
    if not Path(config.reward_model).exists():
        return f"reward model {config.reward_model} not found"
    return "no held-out prompts"


def judge(base: Base, rm_dir: Path, prompts: list[dict], samples: list[dict], *, tie_margin: float = 0.0,
          batch_size: int = 8) -> dict[str, Any]:
    """Score policy and reference replies with the reward model; fill the scores into ``samples``.

    Call it with no adapter on ``base``: ``reward_model`` puts the reward adapter and its head on the same base.
    """
    from stages.reward import reward_model, score

    conversations = [p["messages"] + [{"role": "assistant", "content": s[side]}]
                     for side in ("policy", "reference") for p, s in zip(prompts, samples)]
    with reward_model(base, rm_dir) as scorer:
        scores = score(scorer, base.tokenizer, conversations, batch_size=batch_size)
    n = len(samples)
    wins = losses = ties = 0
    for sample, policy_score, reference_score in zip(samples, scores[:n], scores[n:]):
        sample.update(policy_score=float(policy_score), reference_score=float(reference_score))
        if sample["policy"] == sample["reference"] or abs(policy_score - reference_score) <= tie_margin:
            ties += 1
            sample["outcome"] = "tie"
        elif policy_score > reference_score:
            wins += 1
            sample["outcome"] = "win"
        else:
            losses += 1
            sample["outcome"] = "loss"
    decided = wins + losses
    return {"win_rate": wins / n if n else None, "win_rate_excl_ties": wins / decided if decided else None,
            "wins": wins, "losses": losses, "ties": ties, "win_rate_n": n,
            "reward_policy_mean": sum(scores[:n]) / n if n else None,
            "reward_reference_mean": sum(scores[n:]) / n if n else None}


# ----------------------------------------------------------------------------------------------
# metrics from TRL's logs
# ----------------------------------------------------------------------------------------------

def _eval_metrics(logged: dict[str, float]) -> dict[str, float]:
    metrics = {"eval_loss": logged.get("eval_loss")}
    metrics.update({f"eval_{ours}": logged[f"eval_{theirs}"] for theirs, ours in HEADLINE.items()
                    if f"eval_{theirs}" in logged})
    return metrics


def _final_train_metrics(log_history: list[dict]) -> dict[str, float]:
    last = next((entry for entry in reversed(log_history) if "loss" in entry), {})
    return {f"train_{ours}": last[theirs] for theirs, ours in HEADLINE.items() if theirs in last}


def train_history(log_history: list[dict]) -> list[dict]:
    """Per logged step: loss and the preference metrics (reward accuracy, margin, chosen/rejected log-probs)."""
    return [{"step": entry["step"], "loss": entry["loss"],
             **{ours: entry[theirs] for theirs, ours in HEADLINE.items() if theirs in entry}}
            for entry in log_history if "loss" in entry]


def preflight(config: DPOConfig, skip=lambda path: False) -> None:
    """The first rows of every dataset and of the win-rate prompts, read as run() reads them."""
    data = config.data
    if not data.datasets:
        raise ConfigError("no datasets given: list at least one", field="data.datasets")
    sample_records([*data.datasets, *data.eval_datasets], data_kind(config), skip_invalid=data.skip_invalid,
                   skip=skip)
    if config.win_rate_prompts is not None and not skip(config.win_rate_prompts.path):
        held_out_prompts(config, None, count=SAMPLE_ROWS)


STAGE = Stage(
    name="dpo", config_class=DPOConfig, run=run,
    description="Preference optimisation: DPO, ORPO or KTO.",
    produces_policy=True,
    headline=(Metric("eval_loss", "eval loss"), Metric("eval_reward_accuracy", "DPO acc", "{:.1%}")),
    metrics=("train_loss", "train_runtime_s", "steps", "skipped_nonfinite_steps", "trainable_parameters",
             "total_parameters", "eval_loss",
             *(f"{split}_{name}" for split in ("train", "eval") for name in HEADLINE.values()),
             "win_rate", "win_rate_excl_ties", "wins", "losses", "ties", "win_rate_n", "reward_policy_mean",
             "reward_reference_mean"),
    preflight=preflight,
)
