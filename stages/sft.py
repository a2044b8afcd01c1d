"""Supervised fine-tuning with chat templates: TRL's SFTTrainer over a LoRA adapter on the shared base.

This recipe supports:
- any chat template: the loss mask comes from ``stages.core.chat.assistant_mask`` (no ``{% generation %}``
  markers needed), so only assistant replies and their end-of-turn token are learned;
- every data format in ``stages.core.data`` (messages, ShareGPT, Alpaca, prompt/completion, text), mixed;
- padding-free batches by default: samples are concatenated with position ids that restart per
  sample, so no compute is spent on padding and samples do not attend to each other (sdpa, eager and
  flash-attention all honour this; see docs/architecture.md). ``packed`` fills fixed-size rows, and
  ``padded`` pads to the longest sample of each batch for attention kernels that need a mask;
- QLoRA (4-bit base) on CUDA, fp32 LoRA on CPU, an incoming adapter to continue (e.g. from CPT).

Output directory: adapter, tokenizer with chat template, metrics.json, samples.json (greedy replies to
held-out prompts before and after training), manifest.json.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal

from stages.core.config import field
from stages.core.data import DatasetSpec, load_mixture, tokenize_records
from stages.core.data.sample import sample_stage_data
from stages.core.errors import ConfigError, DataError
from stages.core.evaluation import sample_generations
from stages.core.lifecycle import borrows_base
from stages.core.modeling import Base, LoraSettings, ModelConfig, attach_adapter, detach_adapter
from stages.core.stage import FIT_METRICS, Metric, Stage
from stages.core.training import (StageOutput, TrainingConfig, callbacks, check_trl_args, fit, is_main_process,
                                  perplexity, quiet_trainer, seed_everything, trainable_parameters,
                                  trainer_args)


@dataclasses.dataclass
class SFTData:
    datasets: list[DatasetSpec] = field(default_factory=list, help="Training datasets, mixed by weight or sample count.")
    eval_datasets: list[DatasetSpec] = field(default_factory=list, help="Held-out datasets; when empty, eval_ratio splits the training mix.")
    eval_ratio: float = field(0.05, help="Fraction of the training mix held out for evaluation (seeded).")
    max_length: int | None = field(2048, help="Samples longer than this are truncated (and counted); None keeps all.")
    truncation_side: Literal["right", "left"] = field("right", help="right keeps the start of a long sample, left its end.")
    assistant_only_loss: bool = field(True, help="Loss on assistant replies only (any chat template).")
    rewritten_history: Literal["per_turn", "final_turn"] = field(
        "per_turn", help="For chat templates that render earlier turns differently as a conversation grows (reasoning "
                         "templates dropping past <think> blocks): per_turn trains one sample per assistant turn, "
                         "rendered as the template renders it at that turn; final_turn trains only the final turn.")
    num_proc: int | None = field(None, help="Processes that tokenize the data (datasets' map); None: one.")
    batching: Literal["padding_free", "packed", "padded"] = field(
        "padding_free", help="padding_free: concatenate samples per batch; packed: fill max_length rows; padded: pad per batch.")
    skip_invalid: bool = field(False, help="Skip malformed rows (counted in metrics) instead of stopping.")
    sample_prompts: int = field(4, help="Held-out prompts answered before and after training (samples.json).")

    def __post_init__(self):
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="eval_ratio")
        if self.batching == "packed" and self.max_length is None:
            raise ConfigError("packed batches need a max_length (the row size)", field="max_length")


@dataclasses.dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="Base model (ignored inside a pipeline, which shares its base).")
    lora: LoraSettings = field(default_factory=LoraSettings, help="Adapter shape (an incoming adapter's shape wins).")
    data: SFTData = field(default_factory=SFTData, help="Datasets and how they become batches.")
    training: TrainingConfig = field(default_factory=TrainingConfig, help="Optimisation and output settings.")
    sample_max_new_tokens: int = field(48, help="Length of the before/after sample replies.")

    def __post_init__(self):
        check_trl_args(self.training.trl_args, "trl:SFTConfig")
        if not self.data.datasets:
            raise ConfigError("at least one training dataset is needed", field="data.datasets")


@borrows_base
def run(config: SFTConfig, base: Base, adapter: str | Path | None = None) -> Path:
    """Train an SFT adapter on ``base`` (continuing ``adapter`` if given); return the output directory."""
    from trl import SFTConfig as TRLSFTConfig
    # issue 10 (speed): TRL's SFTTrainer, with the LM head and loss on labelled positions only where TRL
    # scores every position (CPU); identical loss and gradients, see stages/core/training/losses.py.
    from stages.core.training.losses import sft_trainer_class
    SFTTrainer = sft_trainer_class()

    training, data = config.training, config.data
    output = StageOutput(training.output_dir, stage="sft", resume=training.resume,
                         restart=training.restart)

    # ---- data: load, validate, mix, split, tokenize with assistant masks -----------------------
    started = time.time()
    mixture = load_mixture(data.datasets, kind="sft", seed=training.seed, eval_ratio=data.eval_ratio,
                           eval_specs=data.eval_datasets or None, skip_invalid=data.skip_invalid)
    tokenize = dict(max_length=data.max_length, assistant_only=data.assistant_only_loss,
                    truncation_side=data.truncation_side, history=data.rewritten_history, num_proc=data.num_proc)
    train_dataset, train_report = tokenize_records(base.tokenizer, mixture.train, **tokenize)
    eval_dataset, eval_report = tokenize_records(base.tokenizer, mixture.eval, **tokenize)
    if not len(train_dataset):
        raise DataError("no training sample has a loss-bearing token left", hint="raise data.max_length")
    eval_dataset = eval_dataset if len(eval_dataset) else None
    held_out = [r for r in mixture.eval if "messages" in r][:data.sample_prompts]
    output.mark("data", started)

    # ---- model: a LoRA adapter on the shared base ------------------------------------------------
    seed_everything(training.seed)  # the LoRA initialisation follows training.seed
    model = attach_adapter(base.model, config.lora, init_from=adapter,
                           allow_pickle_weights=base.config.allow_pickle_weights)
    try:
        before = sample_generations(model, base.tokenizer, held_out, count=data.sample_prompts,
                                    max_new_tokens=config.sample_max_new_tokens)

        # ---- train --------------------------------------------------------------------------------
        args = trainer_args(
            TRLSFTConfig, training, base, output.work_dir, has_eval=eval_dataset is not None,
            # Truncation already happened above (and was counted); padding-free needs max_length=None.
            max_length=data.max_length if data.batching == "packed" else None,
            padding_free=data.batching == "padding_free",
            packing=data.batching == "packed", packing_strategy="bfd",
            completion_only_loss=False,
        )
        trainer = quiet_trainer(SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=base.tokenizer,
                             callbacks=callbacks(training, has_eval=eval_dataset is not None, title="sft")))
        result = fit(trainer, output, training)

        # ---- evaluate -----------------------------------------------------------------------------
        started = time.time()
        metrics = {"train_loss": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime"),
                   "steps": trainer.state.global_step,
                   "skipped_nonfinite_steps": result.metrics.get("skipped_nonfinite_steps", 0)}
        if eval_dataset is not None:
            eval_metrics = trainer.evaluate()
            metrics["eval_loss"] = eval_metrics["eval_loss"]
            metrics["eval_perplexity"] = perplexity(eval_metrics["eval_loss"])
        after = sample_generations(model, base.tokenizer, held_out, count=data.sample_prompts,
                                   max_new_tokens=config.sample_max_new_tokens)
        trainable, total = trainable_parameters(model)
        metrics.update(trainable_parameters=trainable, total_parameters=total,
                       data={"train": train_report.summary(), "eval": eval_report.summary(),
                             "datasets": mixture.report})
        output.mark("evaluate", started)

        # ---- save ---------------------------------------------------------------------------------
        if is_main_process():
            model.save_pretrained(output.staging, safe_serialization=True)
            base.tokenizer.save_pretrained(output.staging)
            output.write_json("metrics.json", {**metrics, "log_history": trainer.state.log_history})
            output.write_json("samples.json", [{"prompt": b["prompt"], "reference": b["reference"],
                                                "before": b["generated"], "after": a["generated"]}
                                               for b, a in zip(before, after)])
            output.commit(config=config, base=base, data_hashes=mixture.data_hashes, metrics=metrics)
        trainer.accelerator.wait_for_everyone()
    finally:
        detach_adapter(model)
    return output.output_dir


def preflight(config: SFTConfig, skip=lambda path: False) -> None:
    """The first rows of every dataset, read as run() reads them (``lorelay run`` checks before loading)."""
    sample_stage_data(config.data, "sft", skip=skip)


STAGE = Stage(
    name="sft", config_class=SFTConfig, run=run,
    description="Supervised fine-tuning with chat templates.",
    produces_policy=True,
    headline=(Metric("eval_loss", "eval loss"),),
    metrics=(*FIT_METRICS, "eval_loss", "eval_perplexity"),
    preflight=preflight,
)
