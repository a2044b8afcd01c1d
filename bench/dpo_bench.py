"""One set-up of the CPU DPO benchmark, in its own process so that its peak RSS is its own.

    python bench/dpo_bench.py --make-adapter /tmp/sft-adapter           # the incoming "SFT" adapter, once
    python bench/dpo_bench.py --setup lorelay --adapter /tmp/sft-adapter --out /tmp/lorelay.json
    python bench/dpo_bench.py --setup trl --adapter /tmp/sft-adapter --out /tmp/trl.json
    python bench/dpo_bench.py --make-model /tmp/big --shape smollm2-1.7b   # random weights, no download

Both set-ups continue the same adapter with DPO on the same pairs (the first ``--samples`` of the bundled
preference data, in lorelay's seeded order), with the same batch, accumulation, learning rate, beta,
max_length and precision, for the same number of optimizer steps:

  lorelay      ``stages.dpo.run`` itself: one base in memory, the reference a frozen copy of the incoming
               adapter on it; lorelay's packed rows (no padding, each prompt once, LM head on reply tokens
               only: ``stages/core/preference``).
  trl-onebase  TRL's DPOTrainer given the PEFT policy and no ``ref_model``: TRL's own one-base path (it
               copies the adapter as a frozen ``ref`` adapter). Padded: TRL 1.16 switched DPO padding-free off.
  trl          TRL's DPOTrainer given a separately loaded reference model: a second copy of the base with the
               incoming adapter merged into it, the way TRL's DPO examples pass ``ref_model``. Padded.

Activation checkpointing is off in all three (lorelay's CPU default), and every result records its loss
path, batching, attention kernel and TRL ``loss_type``. The incoming adapter has random (not zero) lora_B, so the reference differs
from the bare base as a real SFT adapter would.

How much a shared base saves depends on how much of the memory is weights. ``--make-model`` writes a
randomly initialised Llama of a named shape (``SHAPES``) with the embedded tokenizer, so the same
comparison can run where the weights dominate (a larger model, one pair per step), as they do for
QLoRA on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_bench import SEED, _meter_class, current_rss_mb, peak_rss_mb, run_stage_metered, summarise  # noqa: E402

# Llama shapes for --make-model (random weights; the embedded SmolLM2 tokenizer). "tiny" is for tests.
SHAPES = {
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0),
}

SETUPS = {"lorelay": "lorelay DPO (stages.dpo.run): packed rows; reference = frozen adapter copy on the shared base",
          "trl-onebase": "TRL DPOTrainer given the PEFT model, no ref_model (TRL's one-base reference), padded",
          "trl": "TRL DPOTrainer with a separately loaded reference model, padded"}
TRL_LOSS_PATH = "TRL fused head (every position on CPU; reply positions only with Triton)"


def make_adapter(model_name: str, directory: Path) -> None:
    """A LoRA adapter of lorelay's default shape with small random weights, standing in for an SFT result."""
    import torch

    from stages.core.modeling import LoraSettings, ModelConfig, attach_adapter, load_base

    base = load_base(ModelConfig(name=model_name))
    model = attach_adapter(base.model, LoraSettings())
    torch.manual_seed(SEED)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.01)
    model.save_pretrained(directory, safe_serialization=True)


def make_model(shape: str, directory: Path) -> None:
    """A randomly initialised Llama of ``SHAPES[shape]`` in bf16 safetensors, with the embedded tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stages.core.default_model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
    config = LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer), tie_word_embeddings=True, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    torch.set_default_dtype(torch.bfloat16)  # half the time and memory to build; loaded back as fp32
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def workload(data: Path, samples: int, work: Path) -> Path:
    lines = [line for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()][:samples]
    subset = work / "preference-subset.jsonl"
    subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return subset


def lorelay_config(options, subset: Path, work: Path):
    from stages.core.data import DatasetSpec
    from stages.core.modeling import ModelConfig
    from stages.core.preference.config import DPOConfig, DPOTraining, PreferenceData

    training = DPOTraining(output_dir=work / "dpo", max_steps=options.steps, seed=SEED)
    training.batch_size = options.batch_size or training.batch_size
    training.gradient_accumulation_steps = options.accumulation or training.gradient_accumulation_steps
    return DPOConfig(
        model=ModelConfig(name=options.model),
        data=PreferenceData(datasets=[DatasetSpec(path=str(subset))], eval_ratio=0.0), training=training)


def run_lorelay(options, subset: Path, work: Path, meter) -> dict:
    """``stages.dpo.run`` from the incoming adapter; the meter joins the stage's callbacks."""
    import stages.dpo as dpo_stage
    from stages.core.modeling import ModelConfig, load_base

    config = lorelay_config(options, subset, work)
    base = load_base(ModelConfig(name=options.model))
    output = run_stage_metered(dpo_stage, config, base, meter, adapter=options.adapter)
    metrics = json.loads((output / "metrics.json").read_text())
    return {"reference": metrics.get("reference"), "batching": metrics.get("batching"),
            "loss_path": "lorelay compact (LM head on reply tokens only)", "loss_type": config.loss_type,
            "attn_implementation": base.attn_implementation,
            "activation_checkpointing": base.activation_checkpointing,
            "batch_size": config.training.batch_size,
            "gradient_accumulation_steps": config.training.gradient_accumulation_steps}


def run_trl(options, subset: Path, work: Path, meter) -> dict:
    """TRL's DPOTrainer: with ``ref_model`` (a second, merged copy of the base), or (``trl-onebase``) without."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import stages.dpo as dpo_stage
    from stages.core.default_model import resolve_model_path

    config = lorelay_config(options, subset, work)  # the same data, batch and optimisation settings
    training = config.training
    path = resolve_model_path(options.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                       options.adapter, is_trainable=True)
    reference = None
    if options.setup == "trl":
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                              options.adapter).merge_and_unload()
        reference.eval()
    mixture = dpo_stage.load_preferences(config)
    dataset = Dataset.from_list([dpo_stage.trainer_row(r) for r in mixture.train])
    args = DPOConfig(output_dir=str(work / "trl"), max_steps=options.steps, seed=SEED, data_seed=SEED,
                     per_device_train_batch_size=training.batch_size,
                     gradient_accumulation_steps=training.gradient_accumulation_steps,
                     learning_rate=training.learning_rate, lr_scheduler_type=training.lr_scheduler,
                     warmup_steps=training.warmup_ratio, beta=config.beta, max_length=config.data.max_length,
                     bf16=False, use_cpu=True, gradient_checkpointing=False, report_to=[], save_strategy="no",
                     logging_steps=training.logging_steps, disable_tqdm=True, dataloader_num_workers=0,
                     remove_unused_columns=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[meter])
    trainer.train()
    described = ("separate model (base + merged adapter)" if reference is not None else
                 "adapter copy 'ref' on the one base (TRL)" if "ref" in policy.peft_config else "base (adapters off)")
    return {"reference": described, "batching": "padded (TRL)", "loss_path": TRL_LOSS_PATH,
            "loss_type": list(args.loss_type), "attn_implementation": policy.config._attn_implementation,
            "activation_checkpointing": False, "batch_size": training.batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=sorted(SETUPS))
    parser.add_argument("--make-adapter", type=Path, help="write the incoming adapter here and exit")
    parser.add_argument("--make-model", type=Path, help="write a random model of --shape here and exit")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-1.7b")
    parser.add_argument("--adapter", type=Path, help="incoming adapter directory (from --make-adapter)")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=Path("data/demo/preferences.jsonl"))
    parser.add_argument("--samples", type=int, default=64, help="first N pairs of --data")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the step time")
    parser.add_argument("--batch-size", type=int, help="pairs per micro-batch (default: lorelay's DPO default)")
    parser.add_argument("--accumulation", type=int, help="micro-batches per step (default: lorelay's DPO default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, help="where the JSON result is written")
    options = parser.parse_args(argv)
    making = options.make_adapter is not None or options.make_model is not None
    if not making and (options.setup is None or options.adapter is None or options.out is None):
        parser.error("--setup, --adapter and --out are needed (or --make-adapter DIR, or --make-model DIR)")
    return options


def main(argv=None) -> int:
    os.environ.setdefault("LORELAY_QUIET", "1")
    options = parse_args(argv)
    import torch

    torch.set_num_threads(options.threads)
    if options.make_adapter is not None:
        make_adapter(options.model, options.make_adapter)
        return 0
    if options.make_model is not None:
        make_model(options.shape, options.make_model)
        return 0
    import datasets
    import peft  # noqa: F401  (imported before the baseline so both set-ups' baselines hold the same libraries)
    import transformers
    import trl  # noqa: F401

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    baseline_rss = current_rss_mb()
    started = time.time()
    meter = _meter_class()()
    with tempfile.TemporaryDirectory(prefix=f"lorelay-bench-dpo-{options.setup}-") as tmp:
        work = Path(tmp)
        subset = workload(options.data, options.samples, work)
        runner = run_lorelay if options.setup == "lorelay" else run_trl
        details = runner(options, subset, work, meter)
    summary = summarise(meter, warmup=options.warmup, accumulation=details["gradient_accumulation_steps"])
    result = {"setup": options.setup, "description": SETUPS[options.setup],
              **{k: summary[k] for k in ("steps", "measured_steps", "warmup_steps", "step_times_s", "step_time_s",
                                         "step_time_median_s", "step_cpu_s", "padding_fraction")},
              "peak_rss_mb": round(peak_rss_mb(), 1), "baseline_rss_mb": round(baseline_rss, 1),
              "threads": torch.get_num_threads(), "wall_s": round(time.time() - started, 2), "details": details}
    result["peak_rss_above_baseline_mb"] = round(result["peak_rss_mb"] - result["baseline_rss_mb"], 1)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("setup", "step_time_s", "peak_rss_mb")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
