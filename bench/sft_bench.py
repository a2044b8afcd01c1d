"""One set-up of the CPU SFT benchmark, in its own process so that its peak RSS is its own.

    python bench/sft_bench.py --setup c --out /tmp/c.json            # lorelay's defaults
    python bench/sft_bench.py --setup a --steps 4 --model /path/tiny  # the naive recipe on another model

Every set-up trains the same LoRA adapter (lorelay's default shape) on the same samples, in the same
order (the first ``--samples`` records of the bundled chat data, shuffled by the one seed every
Trainer uses), for the same number of optimizer steps, in fp32, with the same thread count:

  a  the common naive recipe: the conversation rendered into one string, every sample padded to exactly
     512 tokens, loss on every real token, plain ``transformers.Trainer``;
  b  TRL's ``SFTTrainer`` with its default settings (pad to the longest sample of each batch, loss on
     every token of a conversational dataset, activation checkpointing on) except precision: fp32,
     because TRL's bf16 default would turn this into a precision comparison;
  c  lorelay's defaults: ``stages.sft.run`` itself, with only the workload (data file, steps, no held-out
     split or sample generations) set;
  d  as c, with ``model.activation_checkpointing: true`` (lorelay turns it off on CPU for speed; this
     shows what it would save in memory and cost in time);
  e  as c, with ``training.compile: true`` (torch.compile, inductor; not in ``bench/run.py``'s default
     set-ups: each step is faster, the compilation costs minutes, docs/benchmarks.md). ``wall_s`` includes it;
  t  TRL's best on CPU for c's objective (``bench/trl_best.py``): padding-free, assistant-only loss through
     a generation-marked copy of the chat template, no activation checkpointing, no truncation; attention
     sdpa, over the whole packed row with transformers' block mask (TRL recommends flash-attention for
     padding-free batches, which needs CUDA; flex-attention has no backward on CPU in torch 2.13). Set-up c
     runs lorelay's ``sdpa_packed``: sdpa once per sample (``stages/core/attention.py``).

The result is one JSON object (``--out``): per-step wall time (consecutive step ends, so the data
loader, the optimizer and logging are inside it), per-step token counts taken from the batches the
Trainer really used, and peak RSS. ``bench/run.py`` runs the set-ups and turns them into ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("LORELAY_QUIET", "1")  # no progress bar in the children

SETUPS = {"a": "naive: fixed-length padding, loss on every token, transformers.Trainer",
          "b": "TRL SFTTrainer defaults (fp32)",
          "c": "lorelay defaults (stages.sft.run)",
          "d": "lorelay defaults + model.activation_checkpointing=true (the memory lever)",
          "e": "lorelay defaults + training.compile=true (torch.compile, inductor)",
          "t": "TRL SFTTrainer at its best on CPU: padding-free, assistant-only loss, no checkpointing (fp32)"}
NAIVE_LENGTH = 512
# Where each set-up's LM head and loss run. TRL's fused head scores only labelled positions where Triton runs
# (CUDA/XPU); on CPU it projects every position, in chunks, and recomputes the projection in its backward.
LOSS_PATHS = {"a": "full logits (transformers' loss over every position)",
              "b": "TRL fused head (every position on CPU)", "t": "TRL fused head (every position on CPU)",
              "c": "lorelay compact (LM head on reply positions only)",
              "d": "lorelay compact (LM head on reply positions only)",
              "e": "lorelay compact (LM head on reply positions only), compiled"}
SEED = 42
LEARNING_RATE = 2e-4  # the same for every set-up; it does not change the cost of a step


# ----------------------------------------------------------------------------------------------
# measuring: resident memory, and a callback that times steps and counts the tokens of each batch
# ----------------------------------------------------------------------------------------------

def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _meter_class():
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        """Wall time between consecutive optimizer-step ends, and token counts of every collated batch.

        Counting happens in a wrapper around the train dataloader's ``collate_fn``, installed when
        training begins, so it sees exactly the tensors the model is given (the loader may collate one
        batch ahead, so counts are matched to steps by order, not by time).
        ``reply_of`` maps a sample's token ids to its number of assistant-reply tokens (the tokens
        SFT is meant to learn), identical in every set-up because the samples are.
        """

        def __init__(self, reply_of: dict[tuple[int, ...], int] | None = None):
            self.reply_of = reply_of or {}
            self.ends: list[tuple[float, float]] = []     # (wall, process CPU) at each step end
            self.started: tuple[float, float] | None = None
            self.batches: list[dict[str, int]] = []
            self.unmatched = 0

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            # accelerate's DataLoaderShard iterates a DataLoader of its own (``base_dataloader``)
            loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
            if loader is not None:
                collate = loader.collate_fn
                loader.collate_fn = lambda features: self._count(features, collate(features))

        def on_step_begin(self, args, state, control, **kwargs):
            if self.started is None:
                self.started = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((time.perf_counter(), time.process_time()))

        def _count(self, features, batch):
            input_ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            labels = batch.get("labels")
            stats = {"samples": len(features), "processed": int(input_ids.numel()),
                     # a 4-D mask is a packed row's block mask: every position of the row is real
                     "real": int(mask.sum()) if mask is not None and mask.dim() == 2 else int(input_ids.numel()),
                     # the labels the loss uses: shifted by one, -100 ignored
                     "loss": int((labels[..., 1:] != -100).sum()) if labels is not None else 0,
                     "reply": 0}
            for feature in features:
                stats["reply"] += self._reply_tokens(feature)
            self.batches.append(stats)
            return batch

        def _reply_tokens(self, feature) -> int:
            ids = feature.get("input_ids")
            if ids is None:
                return 0
            ids = [int(i) for i in ids]
            mask = feature.get("attention_mask")
            if mask is not None:
                ids = [i for i, m in zip(ids, mask) if int(m)]
            if tuple(ids) not in self.reply_of:
                self.unmatched += 1
                return 0
            return self.reply_of[tuple(ids)]

        def step_times(self, clock: int = 0) -> list[float]:
            """Seconds per step: wall time (clock 0) or CPU time of all this process's threads (clock 1)."""
            marks = ([self.started] if self.started is not None else []) + self.ends
            return [b[clock] - a[clock] for a, b in zip(marks, marks[1:])]

    return StepMeter


def summarise(meter, *, warmup: int, accumulation: int = 1) -> dict:
    """Steady-state numbers: the first ``warmup`` steps are left out of every rate.

    ``accumulation`` micro-batches make one optimizer step; their token counts are added up per step.
    """
    times = meter.step_times()
    cpu_times = meter.step_times(clock=1)
    steps = len(times)
    keys = ("samples", "processed", "real", "loss", "reply")
    micro = meter.batches[:steps * accumulation]
    batches = [{key: sum(b[key] for b in micro[i * accumulation:(i + 1) * accumulation]) for key in keys}
               for i in range(len(micro) // accumulation)]
    if len(batches) < steps:
        raise RuntimeError(f"{steps} steps timed but only {len(micro)} batches counted: the meter missed the loader")
    measured = list(range(min(warmup, max(steps - 1, 0)), steps))
    seconds = sum(times[i] for i in measured)
    total = {key: sum(batches[i][key] for i in measured) for key in keys}
    per_s = (lambda n: n / seconds) if seconds > 0 else (lambda n: None)
    return {
        "steps": steps, "measured_steps": len(measured), "warmup_steps": steps - len(measured),
        "step_times_s": [round(t, 4) for t in times],
        "step_time_s": round(seconds / len(measured), 4) if measured else None,
        "step_time_median_s": round(statistics.median(times[i] for i in measured), 4) if measured else None,
        "measured_seconds": round(seconds, 4),
        # CPU seconds of the process per step: other processes on the machine barely change it, so its ratios
        # check the wall-time ratios on a busy machine (it also counts threads waiting at barriers).
        "step_cpu_s": round(sum(cpu_times[i] for i in measured) / len(measured), 4) if measured else None,
        "tokens": total,
        "tokens_per_step": {key: [b[key] for b in batches] for key in ("processed", "real", "loss", "reply")},
        "padding_fraction": round(1 - total["real"] / total["processed"], 4) if total["processed"] else None,
        "processed_tokens_per_s": per_s(total["processed"]),
        "real_tokens_per_s": per_s(total["real"]),
        "loss_tokens_per_s": per_s(total["loss"]),
        "reply_tokens_per_s": per_s(total["reply"]),
        "unmatched_samples": meter.unmatched,
    }


# ----------------------------------------------------------------------------------------------
# the workload: the same records, in the same order, for every set-up
# ----------------------------------------------------------------------------------------------

def workload(data: Path, samples: int, work: Path) -> tuple[Path, list[dict]]:
    """The first ``samples`` lines of ``data`` as their own file, and lorelay's records of them.

    lorelay's loader shuffles with the seed; every set-up trains on these records in this order.
    """
    from stages.core.data import DatasetSpec, load_mixture

    lines = [line for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()][:samples]
    subset = work / "sft-subset.jsonl"
    subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    mixture = load_mixture([DatasetSpec(path=str(subset))], kind="sft", seed=SEED)
    return subset, mixture.train


def reply_counts(tokenizer, records: list[dict]) -> dict[tuple[int, ...], int]:
    """Token ids of each sample -> its assistant-reply token count (lorelay's mask)."""
    from stages.core.data import encode_record

    counts = {}
    for record in records:
        ids, mask = encode_record(tokenizer, record, assistant_only=True)
        counts[tuple(ids)] = sum(mask)
    return counts


def load_plain(model_name: str):
    """The model and tokenizer as a plain transformers script loads them (fp32, default attention)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.core.default_model import resolve_model_path

    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model, tokenizer


def run_stage_metered(stage_module, config, base, meter, **keywords) -> Path:
    """``stage_module.run(config, base)`` exactly as the CLI runs it, with ``meter`` beside the stage's own
    callbacks (the stage builds its callbacks through its module's ``callbacks`` name)."""
    stage_callbacks = stage_module.callbacks
    stage_module.callbacks = lambda *args, **kwargs: [*stage_callbacks(*args, **kwargs), meter]
    try:
        return stage_module.run(config, base, **keywords)
    finally:
        stage_module.callbacks = stage_callbacks


def lorelay_lora():
    """lorelay's default adapter shape as a peft LoraConfig: every set-up trains the same adapter."""
    from stages.core.modeling import LoraSettings, lora_config

    return lora_config(LoraSettings())


# ----------------------------------------------------------------------------------------------
# the three set-ups
# ----------------------------------------------------------------------------------------------

def run_naive(options, records: list[dict], work: Path, meter) -> dict:
    """(a) One string per conversation, padded to a fixed length, loss on every real token."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    model, tokenizer = load_plain(options.model)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    max_length = NAIVE_LENGTH  # longer samples are cut there, as the recipe does
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)
    encoded["labels"] = [[t if m else -100 for t, m in zip(ids, mask)]
                         for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    dataset = Dataset.from_dict(dict(encoded))
    model = get_peft_model(model, lorelay_lora())
    args = TrainingArguments(output_dir=str(work / "a"), max_steps=options.steps,
                             per_device_train_batch_size=options.batch_size, learning_rate=LEARNING_RATE,
                             seed=SEED, data_seed=SEED, report_to=[], save_strategy="no", logging_steps=10,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[meter])
    trainer.train()
    return {"max_length": max_length, "trainable_parameters": _trainable(model)}


def run_trl_defaults(options, records: list[dict], work: Path, meter) -> dict:
    """(b) TRL's SFTTrainer as its docs show it: model, conversational dataset, peft_config."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_plain(options.model)
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in records])
    args = SFTConfig(output_dir=str(work / "b"), max_steps=options.steps,
                     per_device_train_batch_size=options.batch_size, learning_rate=LEARNING_RATE,
                     seed=SEED, data_seed=SEED, report_to=[], save_strategy="no", use_cpu=True,
                     disable_tqdm=True, dataloader_num_workers=0,
                     bf16=False)  # the one change from TRL's defaults: the same fp32 numerics as a and c
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lorelay_lora(), callbacks=[meter])
    trainer.train()
    return {"gradient_checkpointing": bool(args.gradient_checkpointing), "padding_free": bool(args.padding_free),
            "assistant_only_loss": bool(args.assistant_only_loss), "max_length": args.max_length,
            "trainable_parameters": _trainable(trainer.model)}


def run_lorelay(options, subset: Path, work: Path, meter) -> dict:
    """(c) ``stages.sft.run`` with lorelay's defaults; only the workload is set. (d): checkpointing on.
    (e): training.compile on.

    The meter joins the stage's own callbacks through ``stages.sft.callbacks``, so the stage runs
    exactly as ``lorelay sft`` runs it.
    """
    import stages.sft as sft_stage
    from stages.core.data import DatasetSpec
    from stages.core.modeling import ModelConfig, load_base
    from stages.core.training import TrainingConfig

    model_config = ModelConfig(name=options.model, activation_checkpointing=True if options.setup == "d" else "auto")
    base = load_base(model_config)
    config = sft_stage.SFTConfig(
        model=model_config,
        data=sft_stage.SFTData(datasets=[DatasetSpec(path=str(subset))], eval_ratio=0.0, sample_prompts=0),
        training=TrainingConfig(output_dir=work / "c", max_steps=options.steps, batch_size=options.batch_size,
                                learning_rate=LEARNING_RATE, seed=SEED,
                                compile=True if options.setup == "e" else None))
    output = run_stage_metered(sft_stage, config, base, meter)
    metrics = json.loads((output / "metrics.json").read_text())
    return {"batching": config.data.batching, "assistant_only_loss": config.data.assistant_only_loss,
            "activation_checkpointing": base.activation_checkpointing,
            "attn_implementation": base.attn_implementation, "compile": config.training.compile is True,
            "trainable_parameters": metrics.get("trainable_parameters")}


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), required=True)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=Path("data/demo/sft.jsonl"))
    parser.add_argument("--samples", type=int, default=64, help="first N records of --data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the rates")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, required=True, help="where the JSON result is written")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse_args(argv)
    import torch

    torch.set_num_threads(options.threads)
    import datasets
    import peft  # noqa: F401  (imported before the baseline so every set-up's baseline holds the same libraries)
    import transformers
    import trl  # noqa: F401

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    baseline_rss = current_rss_mb()  # libraries imported, no model yet
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"lorelay-bench-{options.setup}-") as tmp:
        work = Path(tmp)
        subset, records = workload(options.data, options.samples, work)
        from stages.core.default_model import resolve_model_path
        from transformers import AutoTokenizer

        meter = _meter_class()(reply_counts(AutoTokenizer.from_pretrained(resolve_model_path(options.model)), records))
        if options.setup == "a":
            details = run_naive(options, records, work, meter)
        elif options.setup == "b":
            details = run_trl_defaults(options, records, work, meter)
        elif options.setup == "t":
            from trl_best import run_trl_best

            details = run_trl_best(options, records, work, meter, load_plain, lorelay_lora, LEARNING_RATE, SEED)
        else:
            details = run_lorelay(options, subset, work, meter)
    details.setdefault("attn_implementation", "sdpa (transformers default)")
    details.update(loss_path=LOSS_PATHS[options.setup], loss_type="nll",
                   padding="padding-free" if options.setup in "cdet" else
                   ("fixed 512" if options.setup == "a" else "longest in batch"))
    result = {"setup": options.setup, "description": SETUPS[options.setup], **summarise(meter, warmup=options.warmup),
              "peak_rss_mb": round(peak_rss_mb(), 1), "baseline_rss_mb": round(baseline_rss, 1),
              "threads": torch.get_num_threads(), "wall_s": round(time.time() - started, 2), "details": details}
    result["peak_rss_above_baseline_mb"] = round(result["peak_rss_mb"] - result["baseline_rss_mb"], 1)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("setup", "step_time_s", "real_tokens_per_s", "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
