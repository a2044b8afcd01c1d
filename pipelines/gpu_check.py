"""``make gpu-check``: one command that tells, within ten minutes on any single CUDA GPU, whether lorelay's
GPU path works - with no editing.

    make gpu-check                               # = python -m pipelines.gpu_check
    python -m pipelines.gpu_check --dry-run      # CPU: the same plan on a tiny random Llama (run by the tests)

The plan, each item timed and reported as pass / fail / skip (with the reason) in a table and in
``gpu-check.json``:

1. ``chain``: the demo pipeline (``configs/pipelines/demo.yaml``: every stage in it) with 4-bit NF4
   QLoRA and bf16 compute, a few steps per stage, on the demo data;
2. ``sft[...]``: one SFT step with each attention kernel (sdpa, flash-attention 2 when installed), with
   Liger kernels (when installed), and with activation checkpointing on and off;
3. ``launch[...]``: ``accelerate launch`` with one process for each config in ``configs/accelerate/``
   that a single GPU can run (DeepSpeed ones when deepspeed is installed; the multi-node template is
   not a runnable config), one SFT step each;
4. ``merge``: ``lorelay merge`` of the chain's QLoRA SFT adapter, whose merged logits must match the live
   4-bit-base-plus-adapter logits on fixed prompts within ``MERGE_TOLERANCE``;
5. ``bench``: ``bench/gpu.py`` quickly (3 measured steps per combination).

The dry run uses the tiny model, float32 and - where a step needs a GPU kernel or launcher that CPU
lacks - says "skip" with the reason; the 4-bit path runs on CPU too (bitsandbytes), only slowly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import yaml

from stages import registry

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "pipelines" / "demo.yaml"
SFT_RECIPE = ROOT / "configs" / "sft.yaml"
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
# Relative to the logits' scale: bf16 compute on GPU rounds at ~1e-2; the dry run is float32 but its 4-bit
# CPU kernel computes in bf16. Merging into the *original* weights typically misses by the quantisation
# error itself (tens of percent on the tiny model), which this catches.
MERGE_TOLERANCE = 0.05


@dataclasses.dataclass
class Result:
    name: str
    status: str              # pass | fail | skip
    seconds: float
    detail: str


class Skip(Exception):
    """A check that cannot run here (a package or device missing): reported as skip, never as pass."""


@dataclasses.dataclass
class Target:
    """What the checks run on: the embedded model in 4-bit bf16 on CUDA, the tiny model on CPU."""

    dry_run: bool
    model: str
    work: Path

    def model_overrides(self, prefix: str = "") -> list[str]:
        settings = {"name": self.model, "quantization": "4bit",
                    "dtype": "float32" if self.dry_run else "bfloat16"}
        return [f"{prefix}model.{key}={value}" for key, value in settings.items()]

    def sft_overrides(self, name: str) -> list[str]:
        return [*self.model_overrides(), "training.max_steps=1", "training.save_steps=null",
                "training.batch_size=2", "data.sample_prompts=0", f"training.output_dir={self.work / name}"]


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cli(*args: str) -> None:
    """Run ``lorelay ARGS`` in this process; a non-zero exit is a failure with lorelay's own message."""
    from pipelines.cli import main

    code = main(list(args))
    if code != 0:
        raise RuntimeError(f"lorelay {' '.join(args[:2])} exited {code} (its message is printed above)")


def subprocess_check(command: list[str], *, timeout: int = 420) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ACCELERATE_DISABLE_RICH": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-6:]
        raise RuntimeError(f"exit {result.returncode}: " + " | ".join(tail))
    return result.stdout


# ----------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------

def demo_chain(target: Target, steps: int) -> str:
    """The demo pipeline, every stage a few steps, QLoRA; returns the stages' statuses."""
    pipeline = yaml.safe_load(DEMO.read_text())
    pipeline.update(name="gpu-check", run_dir=str(target.work / "chain"))
    pipeline["base"]["model"].update(name=target.model, quantization="4bit",
                                     dtype="float32" if target.dry_run else "bfloat16")
    for stage in pipeline["stages"]:
        settings = stage.setdefault("settings", {})
        if registry.get(stage.get("type") or stage["name"]).has_training:
            settings.setdefault("training", {}).update(max_steps=steps, save_steps=None, eval_steps=None)
        else:  # generate: a few short samples; pairs by the reward model alone - a few steps teach no checks
            settings.update(max_prompts=4, samples_per_prompt=2, max_new_tokens=8, checks=[], min_score_gap=0.0)
        stage["gates"] = []  # a few steps prove the path runs, not that the model improved
    pipeline["evaluation"].update(max_items=2, max_new_tokens=8, task_max_new_tokens=4)
    path = target.work / "gpu-check-pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    cli("run", str(path))
    run = json.loads((target.work / "chain" / "run.json").read_text())
    statuses = {stage["name"]: stage["status"] for stage in run["stages"]}
    unfinished = [name for name, status in statuses.items() if status not in ("done", "cached")]
    if unfinished:
        raise RuntimeError(f"stages not finished: {', '.join(unfinished)}")
    return ", ".join(f"{name} {status}" for name, status in statuses.items())


def sft_step(target: Target, name: str, overrides: list[str], needs: str | None = None) -> str:
    if needs is not None and not installed(needs):
        raise Skip(f"{needs} is not installed")
    cli("sft", "--config", str(SFT_RECIPE), *target.sft_overrides(name), *overrides)
    manifest = json.loads((target.work / name / "manifest.json").read_text())
    base = manifest["base_model"]
    return f"{base['quantization']} {base['dtype']} attn={base['attn_implementation']}"


def accelerate_launch(target: Target, config: Path) -> str:
    text = config.read_text()
    kind = yaml.safe_load(text).get("distributed_type", "")
    if "deepspeed" in config.name and not installed("deepspeed"):
        raise Skip("deepspeed is not installed (pip install 'lorelay[deepspeed]')")
    if target.dry_run and kind in ("FSDP", "DEEPSPEED"):
        # accelerate only honours FSDP/DeepSpeed on accelerator devices; on CPU it fails ("no available devices").
        raise Skip(f"{kind} needs a GPU: accelerate refuses it on CPU")
    name = f"launch-{config.stem}"
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "1",
               "--num_machines", "1", "--main_process_port", str(_free_port()),
               *(["--cpu"] if target.dry_run else []), "-m", "pipelines.cli", "sft", "--config", str(SFT_RECIPE),
               *target.sft_overrides(name)]
    subprocess_check(command)
    effective = json.loads((target.work / name / "manifest.json").read_text())["effective"]
    return f"{kind}, world size {effective['world_size']}"


def merge_fidelity(target: Target) -> str:
    stage = target.work / "chain" / "sft"
    if not (stage / "manifest.json").is_file():
        raise RuntimeError("the chain's sft stage is missing: the merge needs its QLoRA adapter")
    out = target.work / "merged"
    cli("merge", str(stage), "--out", str(out))
    fidelity = json.loads((out / "manifest.json").read_text())["merge"]
    relative = fidelity["max_logit_diff"] / max(fidelity["logit_scale"], 1e-6)
    verdict = (f"{fidelity['merge_base']} base: max logit diff {fidelity['max_logit_diff']:.4g} "
               f"({relative:.2%} of scale {fidelity['logit_scale']:.3g}; tolerance {MERGE_TOLERANCE:.0%})")
    if relative > MERGE_TOLERANCE:
        raise RuntimeError(verdict)
    return verdict


def gpu_bench(target: Target) -> str:
    mode = ["--dry-run"] if target.dry_run else ["--steps", "3", "--warmup", "1"]  # quick: a few steps each
    out = target.work / "bench-gpu.json"
    subprocess_check([sys.executable, str(ROOT / "bench" / "gpu.py"), *mode, "--out", str(out)], timeout=540)
    runs = json.loads(out.read_text()).get("runs", [])
    failed = [run for run in runs if "error" in run]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(runs)} bench runs failed: {failed[0]['error']}")
    return f"{len(runs)} combinations measured"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plan(target: Target) -> list[tuple[str, Callable[[], str]]]:
    steps = 1 if target.dry_run else 3
    checks = [("chain", lambda: demo_chain(target, steps)),
              ("sft[sdpa]", lambda: sft_step(target, "sft-sdpa", ["model.attn_implementation=sdpa"])),
              ("sft[sdpa_packed]", lambda: sft_step(target, "sft-sdpa-packed",
                                                    ["model.attn_implementation=sdpa_packed"])),
              ("sft[flash_attention_2]", lambda: sft_step(target, "sft-flash", ["model.attn_implementation="
                                                                               "flash_attention_2"], "flash_attn")),
              ("sft[liger]", lambda: sft_step(target, "sft-liger", ["training.use_liger_kernel=true"], "liger_kernel")),
              ("sft[checkpointing on]", lambda: sft_step(target, "sft-ckpt-on", ["model.activation_checkpointing=true"])),
              ("sft[checkpointing off]", lambda: sft_step(target, "sft-ckpt-off",
                                                          ["model.activation_checkpointing=false"]))]
    for config in sorted(ACCELERATE_CONFIGS.glob("*.yaml")):
        if config.stem != "multi_node":  # a template with placeholders for several machines
            checks.append((f"launch[{config.stem}]", lambda config=config: accelerate_launch(target, config)))
    checks += [("merge", lambda: merge_fidelity(target)), ("bench", lambda: gpu_bench(target))]
    return checks


def failure_site(err: BaseException) -> str:
    """file:line of the innermost frame in lorelay's code, else the innermost frame (a bare assert has no message)."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if str(ROOT) in f.filename and "site-packages" not in f.filename]
    frame = (ours or frames or [None])[-1]
    inner = frames[-1] if frames else None
    where = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
    return where if inner is None or inner is frame else f"{where} -> {Path(inner.filename).name}:{inner.lineno}"


def run_checks(target: Target, only: list[str] | None = None) -> list[Result]:
    results = []
    for name, check in plan(target):
        if only and not any(name.startswith(prefix) for prefix in only):
            continue
        print(f"gpu-check: {name} ...", flush=True)
        start = time.perf_counter()
        try:
            status, detail = "pass", check()
        except Skip as reason:
            status, detail = "skip", str(reason)
        except (Exception, SystemExit) as err:  # every failure is a row in the table, not the end of the check
            status, detail = "fail", f"{type(err).__name__}: {err} (at {failure_site(err)})"
            (target.work / f"{name}.traceback.txt").write_text("".join(traceback.format_exception(err)))
        results.append(Result(name, status, round(time.perf_counter() - start, 1), detail))
    return results


def device_description(dry_run: bool) -> dict[str, str]:
    import torch

    info = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), cuda=str(torch.version.cuda))
    else:
        info["device"] = "CPU (dry run)" if dry_run else "CPU"
    return info


def print_table(results: list[Result], info: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"lorelay gpu-check: {info['device']}, torch {info['torch']}")
    for column in ("check", "status", "seconds", "detail"):
        table.add_column(column, overflow="fold")
    colours = {"pass": "green", "fail": "red", "skip": "yellow"}
    for result in results:
        # Text, not markup: a detail may hold square brackets (check names, error messages).
        table.add_row(Text(result.name), Text(result.status, style=colours[result.status]),
                      f"{result.seconds:.1f}", Text(result.detail))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: the same plan on a tiny random Llama")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="where the results go")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--only", action="append", default=[], metavar="CHECK",
                        help="run only checks whose name starts with this (repeatable)")
    options = parser.parse_args(argv)
    import torch

    if not options.dry_run and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU and torch.cuda.is_available() is False.\n"
              "  On a CUDA machine: make setup TORCH=torch && make gpu-check\n"
              "  To check this script on CPU: python -m pipelines.gpu_check --dry-run", file=sys.stderr)
        return 2
    out = options.out.resolve()
    # The demo pipeline and recipes name their data relative to the repository.
    with tempfile.TemporaryDirectory(prefix="lorelay-gpu-check-") as scratch, contextlib.chdir(ROOT):
        work = (options.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if options.dry_run:
            from stages.core.default_model import TINY_LLAMA, save_random_llama

            model = str(save_random_llama(work / "tiny-llama", **TINY_LLAMA))
        else:
            model = "embedded:smollm2-135m-instruct"
        target = Target(dry_run=options.dry_run, model=model, work=work)
        results = run_checks(target, options.only)
    info = device_description(options.dry_run)
    print_table(results, info)
    out.write_text(json.dumps({**info, "results": [dataclasses.asdict(r) for r in results]}, indent=2) + "\n")
    print(f"gpu-check: results in {out}")
    return 1 if any(result.status == "fail" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
