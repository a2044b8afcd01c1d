"""GPU benchmark (``make bench-gpu``): lorelay's own SFT and DPO stages on a 1B Llama, tokens/s, memory, MFU.

    make bench-gpu                                    # every available combination, ~10 minutes on one H100
    make bench-gpu ARGS="--docs docs/benchmarks.md"   # ... and write the table into the docs
    python bench/gpu.py --dry-run                     # CPU: a tiny model through every code path (tests)

What runs is the stage path a user runs, not a bare loop: ``stages.sft.run`` and ``stages.dpo.run`` (packed
preference rows) with their defaults, on a randomly initialised Llama of Llama-3.2-1B's shapes (built from
its config, nothing downloaded; the embedded SmolLM2 tokenizer, whose ids fit its 128k vocabulary), loaded
as lorelay loads a base (``stages.core.modeling``: bf16, or 4-bit NF4 QLoRA), with the stages' own bf16
autocast, optimizer and data path. Synthetic chat samples of fixed lengths (``--prompt-len`` user tokens,
``--reply-len`` reply tokens) make the token counts exact. Combinations: {bf16 LoRA, 4-bit QLoRA} x {sdpa,
sdpa_packed (lorelay's sdpa once per packed sample), flash_attention_2 (when flash_attn is installed)} x
{Liger kernels off, on (``training.use_liger_kernel``, when liger_kernel is installed)}, each in its own process.

MFU is achieved model FLOP/s over the GPU's datasheet dense bf16 peak (``PEAK_BF16_TFLOPS``; the measured
matmul rate where the GPU is not listed, and on the dry run). FLOP per token: LoRA does about 4·N (forward
2·N, backward 2·N for activation gradients; frozen weights get no weight gradients), plus attention
(12 · layers · hidden · sequence length, forward and backward, causal half not subtracted); DPO adds the
reference forward (2·N + attention/3 per token) unless its log-probs were precomputed. N counts the weights
of every matrix multiply (decoder linears and the LM head). LoRA's own small matmuls are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Llama-3.2-1B's shapes (about 1.24B parameters with the tied embedding).
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, rms_norm_eps=1e-5)
NO_CUDA = ("bench-gpu needs a CUDA GPU, and torch.cuda.is_available() is False here.\n"
           "  On a CUDA machine: make setup TORCH=torch && make bench-gpu\n"
           "  To check the code paths on CPU with a tiny model: python bench/gpu.py --dry-run")


# Datasheet dense (no sparsity) bf16 tensor-core TFLOP/s, matched on the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "GH200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
                    "H100 PCIe": 756.0, "H100": 756.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.1, "L40": 181.0,
                    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.2, "RTX 6000 Ada": 364.2}


def datasheet_peak(device_name: str) -> float | None:
    """FLOP/s of the first (most specific) entry whose name is in ``device_name``."""
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return None


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------

def matmul_rate(device: str, size: int, repeats: int) -> float:
    """Measured bf16 FLOP/s of one large square matmul (the MFU denominator)."""
    import torch

    dtype = torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_parameters(config) -> int:
    """N: weights that take part in a matrix multiply per token (every nn.Linear incl. the LM head).

    Counted from the config so that 4-bit packing does not change it.
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attention = h * head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    mlp = 3 * h * i
    return layers * (attention + mlp) + config.vocab_size * h


# ----------------------------------------------------------------------------------------------
# one combination (a child process)
# ----------------------------------------------------------------------------------------------

def make_checkpoint(directory: Path, shapes: dict, device: str, dtype_name: str) -> None:
    """The random Llama built from its config (the same weights for every run), with the embedded tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stages.core.default_model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(**{**shapes, "vocab_size": max(shapes["vocab_size"], len(tokenizer))},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype_name))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def synthetic_data(directory: Path, tokenizer, options) -> dict[str, Path]:
    """Chat samples and pairs whose prompt and replies have exactly the requested token counts."""
    import random

    rng = random.Random(0)
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(1000, 6000)) if w.isalpha() and len(w) > 3]

    def text(tokens: int) -> str:
        ids = tokenizer(" ".join(rng.choice(words) for _ in range(tokens)), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:tokens])

    count = options.batch_size * (options.warmup + options.steps)
    sft = [{"messages": [{"role": "user", "content": text(options.prompt_len)},
                         {"role": "assistant", "content": text(options.reply_len)}]} for _ in range(count)]
    pairs = [{"prompt": text(options.prompt_len), "chosen": text(options.reply_len), "rejected": text(options.reply_len)}
             for _ in range(count)]
    paths = {"sft": directory / "sft.jsonl", "dpo": directory / "pairs.jsonl"}
    for key, rows in (("sft", sft), ("dpo", pairs)):
        paths[key].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def run_stage(stage: str, combo: dict, checkpoint: Path, data: Path, work: Path, options) -> dict:
    """One stage run through its own ``run``, timed per optimizer step by a callback beside the stage's."""
    import stages.dpo as dpo_stage
    from stages.core.preference.config import DPOTraining, PreferenceData
    import stages.sft as sft_stage
    from stages.core.data import DatasetSpec
    from stages.core.modeling import ModelConfig, load_base

    sys.path.insert(0, str(HERE))
    from sft_bench import _meter_class, run_stage_metered, summarise

    model_config = ModelConfig(name=str(checkpoint), quantization=combo["quantization"],
                               attn_implementation=combo["attention"], activation_checkpointing=combo["checkpointing"],
                               dtype="float32" if options.dry_run else "bfloat16")
    base = load_base(model_config)
    steps = options.warmup + options.steps
    common = dict(output_dir=work / stage, max_steps=steps, batch_size=options.batch_size, logging_steps=steps,
                  use_liger_kernel=combo["liger"], warmup_ratio=0.0)
    if stage == "sft":
        module = sft_stage
        config = sft_stage.SFTConfig(model=model_config, training=sft_stage.TrainingConfig(**common),
                                     data=sft_stage.SFTData(datasets=[DatasetSpec(path=str(data))], eval_ratio=0.0,
                                                            sample_prompts=0))
    else:
        module = dpo_stage
        config = dpo_stage.DPOConfig(model=model_config,
                                     training=DPOTraining(**common, gradient_accumulation_steps=1),
                                     data=PreferenceData(datasets=[DatasetSpec(path=str(data))],
                                                                   eval_ratio=0.0, max_length=None),
                                     sample_prompts=1, max_new_tokens=1)
    meter = _meter_class()()
    output = run_stage_metered(module, config, base, meter)
    summary = summarise(meter, warmup=options.warmup)
    metrics = json.loads((output / "metrics.json").read_text())
    result = {"stage": stage, "step_time_s": summary["step_time_s"], "tokens_per_step": summary["tokens"]["real"]
              / max(summary["measured_steps"], 1), "batching": metrics.get("batching", "padding-free (SFT)")}
    result["tokens_per_s"] = round(result["tokens_per_step"] / result["step_time_s"], 1)
    if stage == "dpo":
        result["pairs_per_s"] = round(options.batch_size / result["step_time_s"], 3)
        result["reference_forward"] = "precomputed" if dpo_stage.precompute_reference(config) else "every step"
    return result


def flops_per_token(n: int, config, sequence: int, stage: str, reference_forward: bool) -> float:
    """Training FLOP per processed token: LoRA 4·N plus attention, and the reference forward for DPO."""
    attention = 12 * config.num_hidden_layers * config.hidden_size * sequence
    flops = 4 * n + attention
    if stage == "dpo" and reference_forward:
        flops += 2 * n + attention / 3
    return flops


def train_combo(combo: dict, checkpoint: Path, options) -> dict:
    """Both stages for one combination; tokens/s, peak memory, and the numbers MFU needs."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    device = options.device
    config = AutoConfig.from_pretrained(checkpoint)
    n = matmul_parameters(config)
    result = {**combo, "n_matmul_params": n, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="lorelay-gpu-stage-") as tmp:
        data = synthetic_data(Path(tmp), AutoTokenizer.from_pretrained(checkpoint), options)
        for stage in ("sft", "dpo"):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            run = run_stage(stage, combo, checkpoint, data[stage], Path(tmp), options)
            # SFT rows hold prompt + reply; a packed DPO row holds the prompt once and both replies after it
            sequence = options.prompt_len + options.reply_len
            run["flops_per_token"] = flops_per_token(n, config, sequence, stage,
                                                     run.get("reference_forward") == "every step")
            if device.startswith("cuda"):
                run["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            else:
                import resource

                run["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
            result["stages"][stage] = run
    return result


# ----------------------------------------------------------------------------------------------
# the parent: which combinations, then the table
# ----------------------------------------------------------------------------------------------

def combinations(options) -> tuple[list[dict], list[str]]:
    """The combinations to run here, and why any were left out."""
    skipped = []
    quantizations = ["none", "4bit"]
    attentions = ["sdpa", "sdpa_packed", "flash_attention_2"]
    ligers = [False, True]
    if options.dry_run:
        skipped.append("4bit: bitsandbytes 4-bit kernels need CUDA (dry run)")
        quantizations = ["none"]
    elif not installed("bitsandbytes"):
        skipped.append("4bit: bitsandbytes is not installed")
        quantizations = ["none"]
    if options.dry_run or not installed("flash_attn"):
        skipped.append("flash_attention_2: " + ("needs CUDA (dry run)" if options.dry_run
                                               else "flash_attn is not installed (pip install flash-attn)"))
        attentions = [a for a in attentions if a != "flash_attention_2"]
    if options.dry_run:
        skipped.append("sdpa: the same code path as sdpa_packed, lorelay's default (dry run)")
        attentions = ["sdpa_packed"]
    if not installed("liger_kernel"):
        skipped.append("Liger kernels: liger_kernel is not installed (pip install liger-kernel)")
        ligers = [False]
    elif options.dry_run:
        skipped.append("Liger kernels: Triton kernels need a GPU (dry run)")
        ligers = [False]
    dtype = "float32" if options.dry_run else "bfloat16"
    combos = [{"quantization": q, "attention": a, "liger": l, "dtype": dtype, "checkpointing": options.checkpointing}
              for q in quantizations for a in attentions for l in ligers]
    return combos, skipped


def child_command(options, extra: list[str]) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--batch-size", str(options.batch_size),
               "--prompt-len", str(options.prompt_len), "--reply-len", str(options.reply_len),
               "--steps", str(options.steps), "--warmup", str(options.warmup),
               "--device", options.device, *extra]
    if options.dry_run:
        command.append("--dry-run")
    if options.checkpointing:
        command.append("--checkpointing")
    return command


def markdown(results: dict) -> str:
    lines = [f"Measured {results['date']} on **{results['device_name']}** (torch {results['versions']['torch']}, "
             f"transformers {results['versions']['transformers']}); MFU over {results['peak_source']} "
             f"{results['peak_tflops']:.1f} TFLOP/s. Model: random {results['model']} "
             f"(N = {results['n_matmul_params'] / 1e9:.2f}B matmul weights). lorelay's stages with their defaults "
             f"(LoRA r 16 on every linear layer, bf16 autocast), batch {results['batch_size']} of "
             f"{results['prompt_len']}-token prompts and {results['reply_len']}-token replies, activation "
             f"checkpointing {'on' if results['checkpointing'] else 'off'}. FLOP per token: 4·N + attention "
             "(+ the reference forward for DPO).", "",
             "| stage | base | attention | Liger | tokens/s | pairs/s | peak GiB | MFU |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        base = f"{'bf16' if r['dtype'] == 'bfloat16' else r['dtype']} LoRA" if r["quantization"] == "none" else "4-bit QLoRA"
        liger = "on" if r["liger"] else "off"
        if "error" in r:
            lines.append(f"| - | {base} | {r['attention']} | {liger} | failed: {r['error'][:80]} | | | |")
            continue
        for stage, s in r["stages"].items():
            pairs = f"{s['pairs_per_s']:.2f}" if "pairs_per_s" in s else ""
            lines.append(f"| {stage} | {base} | {r['attention']} | {liger} | {s['tokens_per_s']:,.0f} | {pairs} | "
                         f"{s['peak_memory_gib']:.1f} | {s['mfu']:.1%} |")
    for reason in results["skipped"]:
        lines.append(f"\nNot run: {reason}.")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, text: str) -> None:
    start, end = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
    doc = path.read_text(encoding="utf-8")
    if start not in doc or end not in doc:
        raise SystemExit(f"bench-gpu: {path} has no {start} ... {end} markers to write between")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}{end}{tail}", encoding="utf-8")


def parent(options) -> int:
    import torch

    if not options.dry_run and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    import importlib.metadata

    device_name = torch.cuda.get_device_name(0) if not options.dry_run else "CPU (dry run)"
    size, repeats = (512, 3) if options.dry_run else (8192, 50)
    measured = matmul_rate(options.device, size, repeats)
    datasheet = None if options.dry_run else datasheet_peak(device_name)
    rate = datasheet or measured
    combos, skipped = combinations(options)
    results = {"date": time.strftime("%Y-%m-%d"), "device_name": device_name, "dry_run": options.dry_run,
               "model": "tiny Llama (dry run)" if options.dry_run else "Llama-3.2-1B shapes",
               "matmul_tflops": round(measured / 1e12, 2), "peak_tflops": round(rate / 1e12, 2),
               "peak_source": "the datasheet dense bf16 peak" if datasheet else "the measured matmul rate",
               "batch_size": options.batch_size, "prompt_len": options.prompt_len, "reply_len": options.reply_len,
               "checkpointing": options.checkpointing, "skipped": skipped, "runs": [],
               "versions": {m: importlib.metadata.version(m) for m in ("torch", "transformers", "peft")}}
    print(f"bench-gpu: {device_name}, bf16 matmul {rate / 1e12:.1f} TFLOP/s; {len(combos)} combinations", flush=True)
    with tempfile.TemporaryDirectory(prefix="lorelay-bench-gpu-") as tmp:
        checkpoint = Path(tmp) / "llama-1b-random"
        subprocess.run(child_command(options, ["--make-checkpoint", str(checkpoint)]), check=True)
        for combo in combos:
            out = Path(tmp) / "run.json"
            out.unlink(missing_ok=True)
            command = child_command(options, ["--child", json.dumps(combo), "--checkpoint", str(checkpoint),
                                              "--out", str(out)])
            code = subprocess.run(command).returncode
            run = json.loads(out.read_text()) if out.exists() else {**combo, "error": f"exit code {code}"}
            for stage in run.get("stages", {}).values():
                stage["mfu"] = round(stage["flops_per_token"] * stage["tokens_per_s"] / rate, 6)
                results["n_matmul_params"] = run["n_matmul_params"]
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    results.setdefault("n_matmul_params", 0)
    lora_bf16 = [r["stages"]["sft"]["mfu"] for r in results["runs"] if r["quantization"] == "none" and "stages" in r]
    results["target_sft_lora_mfu_at_least_0.40"] = {"best": max(lora_bf16, default=None),
                                                    "met": bool(lora_bf16) and max(lora_bf16) >= 0.40}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    print(text)
    if options.docs is not None:
        write_docs(options.docs, text)
        print(f"bench-gpu: wrote the table into {options.docs}")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU: exercise the code paths")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 4; dry run 2)")
    parser.add_argument("--prompt-len", type=int, default=None, help="user tokens per sample (default 512; dry run 16)")
    parser.add_argument("--reply-len", type=int, default=None, help="reply tokens per sample (default 1024; dry run 16)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 10; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 3; dry run 1)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing (lorelay's CUDA default; off here so MFU counts no recompute)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default bench/gpu_results.json)")
    parser.add_argument("--docs", type=Path, default=None, help="write the markdown table into this file's GPU section")
    # internal: the child processes
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    small = options.dry_run
    defaults = dict(batch_size=2 if small else 4, prompt_len=16 if small else 512, reply_len=16 if small else 1024,
                    steps=2 if small else 10,
                    warmup=1 if small else 3, device="cpu" if small else "cuda:0",
                    out=(Path(tempfile.gettempdir()) / "lorelay-gpu-dry-run.json") if small else HERE / "gpu_results.json")
    for key, value in defaults.items():
        if getattr(options, key) is None:
            setattr(options, key, value)
    return options


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    options = parse_args(argv)
    if options.make_checkpoint is not None:
        make_checkpoint(options.make_checkpoint, TINY if options.dry_run else LLAMA_1B, options.device,
                        "float32" if options.dry_run else "bfloat16")
        return 0
    if options.child is not None:
        result = train_combo(json.loads(options.child), options.checkpoint, options)
        options.out.write_text(json.dumps(result) + "\n")
        return 0
    return parent(options)


if __name__ == "__main__":
    sys.exit(main())
