"""Continued pretraining on raw text: TRL's SFTTrainer over packed blocks and a LoRA adapter on the shared base.

This recipe supports:
- text files or directories of them (one document per file, or split on a separator), JSONL/JSON/
  CSV/Parquet files and ``datasets`` directories with a text column, Hub ids when online
  (``stages.core.data.corpus``, ``stages.core.data.packing``);
- packing: documents joined with EOS into ``block_size`` blocks; position ids restart at each
  document, so packed documents do not attend to each other, and a document's first token is never
  predicted from the one before it. sdpa/eager get ``[batch, block_size]`` rows without an attention
  mask (transformers reads the packed documents from ``position_ids``); flash-attention-2 gets one
  flattened padding-free row with ``cu_seq_lens`` (TRL's collator), as it handles packing only so;
- corpora larger than memory: ``data.streaming`` reads files lazily through a shuffle buffer, up to a
  token budget (``data.max_tokens``);
- training the embeddings and LM head (``lora.modules_to_save: [embed_tokens, lm_head]``) and adding
  new tokens (``new_tokens``, which needs both). A tied model (SmolLM2) gets two trained copies
  (input and output), saved with the adapter; the base's own modules are put back afterwards;
- CPT schedules: ``warmup_stable_decay`` (the decay covers the last ``training.decay_ratio`` of the steps) and
  ``cosine_with_min_lr``.

Assumptions:
- New tokens change the shared base for the length of this stage only: the stage borrows the base
  (``stages.core.lifecycle.borrow``), the tokenizer gains them and the embeddings grow (new rows
  mean-initialised) before the adapter is attached, and on exit the base has its own vocabulary back.
  manifest.json records them under ``vocabulary``; the tokenizer saved with the adapter carries them, and
  whatever loads the adapter later (the next stage, the evaluator, chat, merge) borrows the base with
  it, which adds the same tokens in the same order first.
- The step count is fixed before training (``max_steps``, or epochs over the packed blocks, or the
  token budget when streaming), so the schedule knows its length.

Raises ``DataError`` for unreadable, binary, non-UTF-8 or empty corpora (naming the file, line and
byte offset) and ``ConfigError`` for settings that cannot work together.

Output directory: adapter (with embeddings/LM head when trained), tokenizer (with any new tokens),
metrics.json (perplexity_before / perplexity_after on held-out text), manifest.json.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

from stages.core.config import field
from stages.core.data import (BlockCollator, CorpusReport, CorpusSource, PackedCorpus, blocks_in_batches,
                              corpus_hash, count_tokens, loss_tokens, to_device)
from stages.core.data.sample import sample_corpus
from stages.core.errors import ConfigError, DataError
from stages.core.evaluation import mean_token_loss
from stages.core.lifecycle import borrows_base, extend_vocabulary
from stages.core.modeling import Base, LoraSettings, ModelConfig, attach_adapter, detach_adapter, settings_from_adapter
from stages.core.stage import FIT_METRICS, Metric, Stage
from stages.core.training import (StageOutput, TrainingConfig, callbacks, check_trl_args, fit, is_main_process,
                                  perplexity, quiet_trainer, seed_everything, trainable_parameters,
                                  trainer_args, world_size)


@dataclasses.dataclass
class CPTData:
    sources: list[CorpusSource] = field(default_factory=list, help="Training corpora.")
    eval_sources: list[CorpusSource] = field(default_factory=list,
                                             help="Held-out corpora for perplexity; when empty, eval_ratio of the blocks is held out.")
    eval_ratio: float = field(0.02, help="Fraction of training blocks held out for perplexity when there are no eval_sources (seeded).")
    max_eval_tokens: int = field(32768, help="At most this many held-out tokens are evaluated.")
    block_size: int = field(1024, help="Tokens per packed block (documents joined with EOS, then cut).")
    max_tokens: int | None = field(None, help="Token budget: train on at most this many tokens (needed when streaming, unless max_steps is set).")
    streaming: bool = field(False, help="Read the corpus lazily while training (memory flat in its size) instead of packing it all first.")
    shuffle_buffer: int = field(1024, help="Blocks in the streaming shuffle buffer (memory: shuffle_buffer x block_size tokens).")

    def __post_init__(self):
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="eval_ratio")
        if self.block_size < 16:
            raise ConfigError("must be at least 16 tokens", field="block_size")
        if self.max_tokens is not None and self.max_tokens < self.block_size:
            raise ConfigError(f"must be at least one block ({self.block_size} tokens)", field="max_tokens")
        if self.max_eval_tokens < 2:
            raise ConfigError("must be at least 2", field="max_eval_tokens")
        if self.shuffle_buffer < 0:
            raise ConfigError("must be 0 (no shuffling) or more", field="shuffle_buffer")


@dataclasses.dataclass
class CPTTraining(TrainingConfig):
    # CPT's schedule usually ends in a longer decay than a fine-tune's (annealing on the domain).
    decay_ratio: float = field(0.2, help="warmup_stable_decay: share of the steps spent in the final decay.")


@dataclasses.dataclass
class CPTConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="Base model (ignored inside a pipeline, which shares its base).")
    lora: LoraSettings = field(default_factory=LoraSettings, help="Adapter shape (an incoming adapter's shape wins).")
    data: CPTData = field(default_factory=CPTData, help="Corpora and how they become blocks.")
    training: CPTTraining = field(default_factory=CPTTraining, help="Optimisation and output settings.")
    new_tokens: list[str] = field(default_factory=list,
                                  help="Tokens added to the tokenizer (embeddings resized; needs embed_tokens and lm_head in lora.modules_to_save).")

    def __post_init__(self):
        check_trl_args(self.training.trl_args, "trl:SFTConfig")
        if not self.data.sources:
            raise ConfigError("at least one training corpus is needed", field="data.sources")
        if self.data.streaming and self.data.max_tokens is None and self.training.max_steps <= 0:
            raise ConfigError("a streamed corpus has no known length: set a token budget", field="data.max_tokens",
                              hint="or set training.max_steps")
        for index, token in enumerate(self.new_tokens):
            if not token or token != token.strip():
                raise ConfigError("must be a non-empty token without outer whitespace", field=f"new_tokens.{index}")


@borrows_base
def run(config: CPTConfig, base: Base, adapter: str | Path | None = None) -> Path:
    """Train a CPT adapter on ``base`` (continuing ``adapter`` if given); return the output directory."""
    from datasets import Dataset, Features, IterableDataset, Sequence, Value
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    training, data = config.training, config.data
    lora = settings_from_adapter(adapter) if adapter is not None else config.lora
    check_new_tokens(base, lora, config.new_tokens, adapter)
    output = StageOutput(training.output_dir, stage="cpt", resume=training.resume,
                         restart=training.restart)

    # ---- tokenizer: new tokens grow the shared base's embeddings, before any adapter --------------
    vocabulary = extend_vocabulary(base, config.new_tokens)

    # ---- data: read, tokenize with EOS between documents, pack, hold out ---------------------------
    started = time.time()
    corpus = PackedCorpus(data.sources, base.tokenizer, block_size=data.block_size, seed=training.seed,
                          shuffle_files=True, shuffle=data.shuffle_buffer if data.streaming else 0,
                          max_tokens=data.max_tokens)
    if data.eval_sources:
        eval_corpus = PackedCorpus(data.eval_sources, base.tokenizer, block_size=data.block_size,
                                   max_tokens=data.max_eval_tokens)
        eval_blocks = list(eval_corpus)
        eval_report = eval_corpus.report
    else:
        eval_blocks = corpus.hold_out(data.eval_ratio, data.max_eval_tokens) if data.eval_ratio > 0 else []
        eval_report = CorpusReport(tokens=count_tokens(eval_blocks), blocks=len(eval_blocks))
    features = Features({"input_ids": Sequence(Value("int32")), "seq_lengths": Sequence(Value("int32"))})
    if data.streaming:
        train_dataset = IterableDataset.from_generator(corpus.__iter__, features=features)
        blocks = None
    else:
        blocks = list(corpus)
        if not blocks:
            raise DataError("no training blocks: every block was held out for evaluation",
                            file=data.sources[0].path, hint="lower data.eval_ratio, or give data.eval_sources")
        train_dataset = Dataset.from_dict({"input_ids": [b["input_ids"] for b in blocks],
                                           "seq_lengths": [b["seq_lengths"] for b in blocks]}, features=features)
    steps = planned_steps(training, data, blocks)
    eval_dataset = Dataset.from_list(eval_blocks, features=features) if eval_blocks else None
    output.mark("data", started)

    # ---- model: a LoRA adapter on the shared base (embeddings/LM head in full when asked) ----------
    flash = base.attn_implementation.startswith("flash")
    train_collator = None if flash else BlockCollator(base.tokenizer.pad_token_id)
    eval_collate = eval_collator(base)
    seed_everything(training.seed)  # the LoRA initialisation follows training.seed
    with warnings.catch_warnings():
        # Tied embeddings in modules_to_save: PEFT trains separate input/output copies, saved and
        # loaded together; detach_adapter() gives the base its own (tied) modules back.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        model = attach_adapter(base.model, config.lora, init_from=adapter,
                               allow_pickle_weights=base.config.allow_pickle_weights)
    try:
        loss_before = heldout_loss(model, eval_blocks, eval_collate, training.batch_size, base.device)

        # ---- train --------------------------------------------------------------------------------
        args = trainer_args(
            TRLSFTConfig, training, base, output.work_dir, has_eval=eval_dataset is not None,
            max_steps=steps,
            max_length=None,                    # blocks are already block_size long
            padding_free=flash,                 # flash-attention: one flattened row with cu_seq_lens
            packing=False, completion_only_loss=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            include_num_input_tokens_seen="all",
        )
        trainer = quiet_trainer(SFTTrainer(model=model, args=args, train_dataset=train_dataset,
                                           eval_dataset=eval_dataset, data_collator=train_collator,
                                           processing_class=base.tokenizer,
                                           callbacks=callbacks(training, has_eval=eval_dataset is not None,
                                                               title="cpt")))
        result = fit(trainer, output, training)

        # ---- evaluate: held-out perplexity before and after ---------------------------------------
        started = time.time()
        loss_after = heldout_loss(model, eval_blocks, eval_collate, training.batch_size, base.device)
        runtime = result.metrics.get("train_runtime")
        tokens_seen = trainer.state.num_input_tokens_seen
        trainable, total = trainable_parameters(model)
        metrics = {
            "perplexity_before": perplexity(loss_before), "perplexity_after": perplexity(loss_after),
            "eval_loss_before": loss_before, "eval_loss_after": loss_after,
            "eval_tokens": loss_tokens(eval_blocks),
            "train_loss": result.training_loss, "train_runtime_s": runtime, "steps": trainer.state.global_step,
            "skipped_nonfinite_steps": result.metrics.get("skipped_nonfinite_steps", 0),
            "train_tokens": tokens_seen,
            "train_tokens_per_second": round(tokens_seen / runtime, 1) if runtime else None,
            "trainable_parameters": trainable, "total_parameters": total,
            "data": {"train": corpus.report.summary(), "eval": eval_report.summary(),
                     "eval_from": "eval_sources" if data.eval_sources else f"held-out blocks (eval_ratio={data.eval_ratio})",
                     "block_size": data.block_size, "streaming": data.streaming},
        }
        if vocabulary:
            metrics["vocabulary"] = vocabulary
        output.mark("evaluate", started)

        # ---- save ---------------------------------------------------------------------------------
        if is_main_process():
            model.save_pretrained(output.staging, safe_serialization=True,
                                  save_embedding_layers=embedding_layers_to_save(base.model, lora))
            base.tokenizer.save_pretrained(output.staging)
            output.write_json("metrics.json", {**metrics, "log_history": trainer.state.log_history})
            hashes = {source.path: corpus_hash(source) for source in [*data.sources, *data.eval_sources]}
            output.commit(config=config, base=base, data_hashes=hashes, metrics=metrics,
                          extra={"vocabulary": vocabulary} if vocabulary else None)
        trainer.accelerator.wait_for_everyone()
    finally:
        detach_adapter(model)  # puts the base's own modules back where PEFT trained full copies
    return output.output_dir


# ----------------------------------------------------------------------------------------------
# The pieces of the recipe
# ----------------------------------------------------------------------------------------------

def embedding_module_names(model) -> tuple[str, str | None]:
    """Short names (as ``modules_to_save`` takes them) of the input embeddings and the LM head."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    output_embeddings = model.get_output_embeddings()
    return names[id(model.get_input_embeddings())], (names.get(id(output_embeddings)) if output_embeddings is not None else None)


def embedding_layers_to_save(model, lora: LoraSettings) -> bool | str:
    """PEFT's ``save_embedding_layers``: False when modules_to_save already holds the embeddings and LM
    head in full ("auto" would save the resized modules a second and third time), else "auto"."""
    saved = {name.rsplit(".", 1)[-1] for name in lora.modules_to_save}
    needed = {name for name in embedding_module_names(model) if name is not None}
    return False if needed <= saved else "auto"


def check_new_tokens(base: Base, lora: LoraSettings, tokens: list[str], adapter: str | Path | None) -> None:
    """New tokens need trained embeddings and LM head; refuse early, before anything is written."""
    missing_tokens = [token for token in tokens if token not in base.tokenizer.get_vocab()]
    if not missing_tokens:
        return
    needed = [name for name in embedding_module_names(base.model) if name is not None]
    saved = {name.rsplit(".", 1)[-1] for name in lora.modules_to_save}
    lacking = [name for name in needed if name not in saved]
    if lacking:
        raise ConfigError(f"new tokens ({', '.join(missing_tokens[:3])}{', ...' if len(missing_tokens) > 3 else ''}) "
                          f"start with untrained embeddings: they need {', '.join(needed)} trained in full",
                          field="lora.modules_to_save", hint=f"add modules_to_save: [{', '.join(needed)}]")
    if adapter is not None:
        raise ConfigError("cannot add new tokens while continuing an adapter: its saved embeddings have the old "
                          "vocabulary size", field="new_tokens", hint="add the tokens in the stage that starts the adapter")


def planned_steps(training: TrainingConfig, data: CPTData, blocks: list | None) -> int:
    """Optimizer steps: max_steps, else the token budget (streaming), else epochs over the blocks."""
    if training.max_steps > 0:
        return training.max_steps
    tokens_per_step = data.block_size * training.batch_size * training.gradient_accumulation_steps * world_size()
    if blocks is None:
        return max(1, math.ceil(data.max_tokens / tokens_per_step))
    micro_batches = math.ceil(len(blocks) / (training.batch_size * world_size()))
    per_epoch = math.ceil(micro_batches / training.gradient_accumulation_steps)
    return max(1, math.ceil(training.epochs * per_epoch))


def eval_collator(base: Base):
    """The batch layout training uses on this base: rows for sdpa/eager, one flattened row for flash."""
    if base.attn_implementation.startswith("flash"):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=base.tokenizer.pad_token_id, padding_free=True)
    return BlockCollator(base.tokenizer.pad_token_id)


def heldout_loss(model, blocks: list[dict], collate, batch_size: int, device: str) -> float | None:
    """Mean next-token loss over the held-out blocks' loss-bearing tokens (None without blocks)."""
    if not blocks:
        return None
    batches = (to_device(collate(list(group)), device) for group in blocks_in_batches(blocks, batch_size))
    return mean_token_loss(model, batches)


def preflight(config: CPTConfig, skip=lambda path: False) -> None:
    """The first document of every corpus, read as run() reads it (``lorelay run`` checks before loading)."""
    if not config.data.sources:
        raise ConfigError("no corpus given: list at least one source", field="data.sources")
    sample_corpus([*config.data.sources, *config.data.eval_sources], skip=skip)


STAGE = Stage(
    name="cpt", config_class=CPTConfig, run=run,
    description="Continued pretraining on raw text.",
    produces_policy=True,
    headline=(Metric("perplexity_after", "CPT ppl", "{:.2f}"),),
    card_tags=("continued-pretraining",),
    metrics=(*FIT_METRICS, "perplexity_before", "perplexity_after", "eval_loss_before", "eval_loss_after",
             "eval_tokens", "train_tokens", "train_tokens_per_second"),
    preflight=preflight,
)
