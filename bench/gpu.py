"""GPU benchmark (``make bench-gpu``): LoRA and QLoRA training throughput, memory and MFU of a 1B Llama.

    make bench-gpu                                    # every available combination, ~10 minutes on one H100
    make bench-gpu ARGS="--docs docs/benchmarks.md"   # ... and write the table into the docs
    python bench/gpu.py --dry-run                     # CPU: a tiny model through every code path (tests)

The model is a randomly initialised Llama built from its config (Llama-3.2-1B shapes; nothing is
downloaded), saved once to a temporary directory so every combination trains the same weights, and
loaded the way lorelay loads a base (``stages.core.modeling``: bf16, or 4-bit NF4 via bitsandbytes with
k-bit preparation) with lorelay's default LoRA adapter on every linear layer. Combinations:
{bf16 LoRA, 4-bit QLoRA} x {sdpa, flash_attention_2 (when flash_attn is installed)} x
{Liger kernels off, on (when liger_kernel is installed)}, each in its own process so peak memory and
Liger's class patches stay its own.

MFU is achieved model FLOP/s over the bf16 matrix rate measured first on this GPU (a large
``torch.matmul``), not the data-sheet peak. LoRA does about 4·N FLOP per token (forward 2·N, backward
2·N for the activation gradients; the frozen weights get no weight gradients), so ``mfu_4n`` is the
honest figure; ``mfu_6n`` (the usual full fine-tuning count) is reported beside it for comparison.
N counts the weights of every matrix multiply (decoder linears and the LM head, not the embedding
lookup); attention-score FLOPs and activation recomputation are not counted.
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


def matmul_parameters(model) -> int:
    """N: weights that take part in a matrix multiply per token (every nn.Linear incl. the LM head).

    Counted from the config so that 4-bit packing does not change it.
    """
    config = model.config
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attention = h * head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    mlp = 3 * h * i
    return layers * (attention + mlp) + config.vocab_size * h


# ----------------------------------------------------------------------------------------------
# one combination (a child process)
# ----------------------------------------------------------------------------------------------

def make_checkpoint(directory: Path, shapes: dict, device: str, dtype_name: str) -> None:
    """Build the random Llama from its config on ``device`` and save it (the same weights for every run)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shapes, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype_name))
    model.save_pretrained(directory, safe_serialization=True)


def load(checkpoint: Path, combo: dict, device: str):
    """The base as lorelay loads it (dtype, attention, 4-bit + k-bit preparation), plus lorelay's LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.core.modeling import LoraSettings, attach_adapter, bnb_config

    dtype = getattr(torch, combo["dtype"])
    kwargs = dict(dtype=dtype, attn_implementation=combo["attention"])
    if combo["quantization"] == "4bit":
        kwargs.update(quantization_config=bnb_config("4bit", dtype), device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    if combo["quantization"] == "none":
        model.to(device)
    model.config.use_cache = False
    if combo["quantization"] == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=combo["checkpointing"])
    elif combo["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for param in model.parameters():
        param.requires_grad_(False)
    if combo["checkpointing"]:
        model.enable_input_require_grads()
    return attach_adapter(model, LoraSettings())


def train_combo(combo: dict, checkpoint: Path, options) -> dict:
    import torch

    device = options.device
    if combo["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Class-level patches (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy): this process only.
        apply_liger_kernel_to_llama()
    model = load(checkpoint, combo, device)
    model.train()
    n = matmul_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.startswith("cuda"))
    vocab = model.config.vocab_size
    generator = torch.Generator(device="cpu").manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(options.warmup + options.steps):
        ids = torch.randint(0, vocab, (options.batch_size, options.seq_len), generator=generator).to(device)
        synchronize(device)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= options.warmup:
            times.append(time.perf_counter() - started)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
    tokens = options.batch_size * options.seq_len
    tokens_per_s = tokens * len(times) / sum(times)
    result = {**combo, "n_matmul_params": n, "tokens_per_step": tokens,
              "step_time_s": round(sum(times) / len(times), 4), "tokens_per_s": round(tokens_per_s, 1),
              "achieved_tflops_4n": round(4 * n * tokens_per_s / 1e12, 2),
              "achieved_tflops_6n": round(6 * n * tokens_per_s / 1e12, 2),
              "trainable_parameters": sum(p.numel() for p in trainable), "final_loss": round(loss.item(), 4)}
    if device.startswith("cuda"):
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
    else:
        import resource

        result["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    return result


# ----------------------------------------------------------------------------------------------
# the parent: which combinations, then the table
# ----------------------------------------------------------------------------------------------

def combinations(options) -> tuple[list[dict], list[str]]:
    """The combinations to run here, and why any were left out."""
    skipped = []
    quantizations = ["none", "4bit"]
    attentions = ["sdpa", "flash_attention_2"]
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
        attentions = ["sdpa"]
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
               "--seq-len", str(options.seq_len), "--steps", str(options.steps), "--warmup", str(options.warmup),
               "--device", options.device, *extra]
    if options.dry_run:
        command.append("--dry-run")
    if options.checkpointing:
        command.append("--checkpointing")
    return command


def markdown(results: dict) -> str:
    lines = [f"Measured {results['date']} on **{results['device_name']}** (torch {results['versions']['torch']}, "
             f"transformers {results['versions']['transformers']}); bf16 matmul rate measured "
             f"{results['matmul_tflops']:.1f} TFLOP/s. Model: random {results['model']} "
             f"(N = {results['n_matmul_params'] / 1e9:.2f}B matmul weights), batch {results['batch_size']} x "
             f"{results['seq_len']} tokens, activation checkpointing {'on' if results['checkpointing'] else 'off'}, "
             "lorelay's LoRA (r 16, every linear layer).", "",
             "| base | attention | Liger | tokens/s | peak GiB | MFU 4·N | MFU 6·N |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        base = f"{'bf16' if r['dtype'] == 'bfloat16' else r['dtype']} LoRA" if r["quantization"] == "none" else "4-bit QLoRA"
        if "error" in r:
            lines.append(f"| {base} | {r['attention']} | {'on' if r['liger'] else 'off'} | failed: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {base} | {r['attention']} | {'on' if r['liger'] else 'off'} | {r['tokens_per_s']:,.0f} | "
                     f"{r['peak_memory_gib']:.1f} | {r['mfu_4n']:.0%} | {r['mfu_6n']:.0%} |")
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
    rate = matmul_rate(options.device, size, repeats)
    combos, skipped = combinations(options)
    results = {"date": time.strftime("%Y-%m-%d"), "device_name": device_name, "dry_run": options.dry_run,
               "model": "tiny Llama (dry run)" if options.dry_run else "Llama-3.2-1B shapes",
               "matmul_tflops": round(rate / 1e12, 2), "batch_size": options.batch_size, "seq_len": options.seq_len,
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
            if "tokens_per_s" in run:
                # From the unrounded rate: the rounded TFLOP/s figures are 0.0x on a dry run.
                flops_per_token = run["n_matmul_params"] * run["tokens_per_s"]
                run["mfu_4n"] = round(4 * flops_per_token / rate, 6)
                run["mfu_6n"] = round(6 * flops_per_token / rate, 6)
                results["n_matmul_params"] = run["n_matmul_params"]
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    results.setdefault("n_matmul_params", 0)
    lora_bf16 = [r.get("mfu_4n", 0) for r in results["runs"] if r["quantization"] == "none"]
    results["target_lora_mfu_4n_at_least_0.40"] = {"best": max(lora_bf16, default=None),
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
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; dry run 64)")
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
    defaults = dict(batch_size=2 if small else 4, seq_len=64 if small else 2048, steps=2 if small else 10,
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
