"""CPU benchmark (``make bench``): lorelay's SFT and DPO against the common recipes, side by side, as ratios.

    make bench                                   # the full run (about 10 minutes on 2 cores)
    make bench ARGS="--repeats 2"                # a,b,c,a,b,c ... : ratios per round, medians reported
    make bench ARGS="--skip-dpo --skip-dpo-large --steps 3"   # a quicker look at SFT only

Each set-up runs in its own process (``bench/sft_bench.py``, ``bench/dpo_bench.py``), one after the
other, so peak RSS is per set-up and the set-ups never share the CPU. Timings on a shared machine are
noisy; the ratios of set-ups measured in the same run, round by round, are what this reports. The
table goes to the terminal, everything to ``bench/results.json`` (with the load average before and
after, so a reader can judge how quiet the machine was). See ``bench/README.md`` for the definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (name, what is compared, target, direction): "min" means the ratio must be at least the target.
TARGETS = [
    ("sft_c_over_a_reply_tokens_per_s", "SFT (c)/(a) loss-bearing tokens/s (reply tokens: same work in every set-up)", 3.0, "min"),
    ("sft_c_over_b_reply_tokens_per_s", "SFT (c)/(b) loss-bearing tokens/s (reply tokens: same work in every set-up)", 1.5, "min"),
    ("sft_c_over_b_peak_rss", "SFT peak RSS (c)/(b)", 1.0, "max"),
    ("dpo_lorelay_over_trl_peak_rss_above_baseline", "DPO peak memory lorelay/TRL-with-ref-model (RSS above the imported-libraries baseline)", 0.6, "max"),
    ("dpo_weight_bound_lorelay_over_trl_peak_rss_above_baseline", "the same, weight-bound DPO workload (larger model, 1 pair per step)", 0.6, "max"),
]


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def run_child(script: str, arguments: list[str], out: Path, log: Path, timeout: int) -> dict:
    """Run one set-up in a fresh interpreter; its JSON result, or an error naming its log."""
    command = [sys.executable, str(HERE / script), *arguments, "--out", str(out)]
    started = time.time()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0 or not out.exists():
        raise SystemExit(f"bench: {script} {' '.join(arguments)} failed ({code}); see {log}")
    result = json.loads(out.read_text())
    print(f"  {script} {arguments[1]}: {time.time() - started:.0f}s, step {result['step_time_s']}s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def ratio(numerator, denominator):
    if numerator is None or denominator in (None, 0):
        return None
    return round(numerator / denominator, 3)


# ----------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------

# rate -> the token count it divides by the step time
SFT_RATES = {"reply_tokens_per_s": "reply", "real_tokens_per_s": "real", "loss_tokens_per_s": "loss",
             "processed_tokens_per_s": "processed"}


def combine(rounds: list[dict]) -> dict:
    """One set-up over its rounds: the median step time (rates follow from it), the highest peak RSS."""
    first = rounds[0]
    step = statistics.median(r["step_time_s"] for r in rounds)
    combined = {key: first[key] for key in ("setup", "description", "steps", "measured_steps", "warmup_steps",
                                             "details", "threads") if key in first}
    cpu = [r["step_cpu_s"] for r in rounds if r.get("step_cpu_s") is not None]
    combined.update(step_time_s=round(step, 4), step_time_s_rounds=[r["step_time_s"] for r in rounds],
                    step_cpu_s=round(statistics.median(cpu), 4) if cpu else None,
                    peak_rss_mb=max(r["peak_rss_mb"] for r in rounds),
                    baseline_rss_mb=max(r["baseline_rss_mb"] for r in rounds),
                    peak_rss_above_baseline_mb=max(r["peak_rss_above_baseline_mb"] for r in rounds),
                    padding_fraction=first.get("padding_fraction"))
    if "tokens" in first:
        measured = first["measured_steps"]
        combined["tokens_per_step"] = {key: round(value / measured, 1) for key, value in first["tokens"].items()}
        for rate, key in SFT_RATES.items():
            combined[rate] = round(combined["tokens_per_step"][key] / step, 2) if step else None
        combined["unmatched_samples"] = first["unmatched_samples"]
        combined["tokens_each_step"] = first["tokens_per_step"]  # per step, warm-up included
    return combined


def sft_section(rounds: dict[str, list[dict]]) -> dict:
    setups = {name: combine(results) for name, results in rounds.items()}
    section: dict = {"setups": setups, "ratios": {}, "same_samples": None}
    real = {name: results[0]["tokens_per_step"]["real"] for name, results in rounds.items()}
    section["same_samples"] = len({tuple(v) for v in real.values()}) == 1
    section["real_tokens_each_step"] = real
    for ours in ("c", "d"):
        for other in ("a", "b"):
            if ours not in setups or other not in setups:
                continue
            c, o = setups[ours], setups[other]
            ratios = {rate: ratio(c[rate], o[rate]) for rate in SFT_RATES}
            ratios["speedup_step_time"] = ratio(o["step_time_s"], c["step_time_s"])
            ratios["speedup_cpu_time"] = ratio(o["step_cpu_s"], c["step_cpu_s"])
            ratios["peak_rss"] = ratio(c["peak_rss_mb"], o["peak_rss_mb"])
            ratios["peak_rss_above_baseline"] = ratio(c["peak_rss_above_baseline_mb"], o["peak_rss_above_baseline_mb"])
            # the same ratio round by round (set-ups of one round ran back to back)
            ratios["speedup_per_round"] = [ratio(x["step_time_s"], y["step_time_s"])
                                           for x, y in zip(rounds[other], rounds[ours])]
            section["ratios"][f"{ours}_over_{other}"] = ratios
    return section


# ----------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------

def dpo_section(rounds: dict[str, list[dict]]) -> dict:
    setups = {name: combine(results) for name, results in rounds.items()}
    section: dict = {"setups": setups, "ratios": {}}
    if {"lorelay", "trl"} <= setups.keys():
        ours, theirs = setups["lorelay"], setups["trl"]
        section["ratios"]["lorelay_over_trl"] = {
            "step_time": ratio(ours["step_time_s"], theirs["step_time_s"]),
            "step_cpu_time": ratio(ours["step_cpu_s"], theirs["step_cpu_s"]),
            "peak_rss": ratio(ours["peak_rss_mb"], theirs["peak_rss_mb"]),
            "peak_rss_above_baseline": ratio(ours["peak_rss_above_baseline_mb"], theirs["peak_rss_above_baseline_mb"]),
            "step_time_per_round": [ratio(x["step_time_s"], y["step_time_s"])
                                    for x, y in zip(rounds["lorelay"], rounds["trl"])],
        }
    return section


def run_dpo(options, work: Path, summary: str, *, model: str, samples: int, extra: list[str] = ()):
    """Both DPO set-ups on one workload, ``--repeats`` rounds: the workload's description and its section."""
    work.mkdir(parents=True, exist_ok=True)
    common = ["--model", model, "--threads", str(options.threads)]
    adapter = work / "sft-adapter"
    subprocess.run([sys.executable, str(HERE / "dpo_bench.py"), "--make-adapter", str(adapter), *common],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    arguments = [*common, "--adapter", str(adapter), "--steps", str(options.dpo_steps),
                 "--warmup", str(options.dpo_warmup), "--samples", str(samples), *extra]
    workload = {"summary": summary, "model": model, "samples": samples, "steps": options.dpo_steps,
                "warmup_steps": options.dpo_warmup}
    rounds: dict[str, list[dict]] = {"lorelay": [], "trl": []}
    print(f"DPO set-ups lorelay,trl x {options.repeats}: {summary}", flush=True)
    for index in range(options.repeats):
        for setup in rounds:
            rounds[setup].append(run_child("dpo_bench.py", ["--setup", setup, *arguments],
                                           work / f"{setup}-{index}.json", options.log, options.timeout))
    return workload, dpo_section(rounds)


# ----------------------------------------------------------------------------------------------
# targets and the table
# ----------------------------------------------------------------------------------------------

def target_values(results: dict) -> dict[str, float | None]:
    sft = results.get("sft", {}).get("ratios", {})
    dpo = results.get("dpo", {}).get("ratios", {}).get("lorelay_over_trl", {})
    large = results.get("dpo_weight_bound", {}).get("ratios", {}).get("lorelay_over_trl", {})
    return {
        "sft_c_over_a_reply_tokens_per_s": sft.get("c_over_a", {}).get("reply_tokens_per_s"),
        "sft_c_over_b_reply_tokens_per_s": sft.get("c_over_b", {}).get("reply_tokens_per_s"),
        "sft_c_over_b_peak_rss": sft.get("c_over_b", {}).get("peak_rss"),
        "dpo_lorelay_over_trl_peak_rss_above_baseline": dpo.get("peak_rss_above_baseline"),
        "dpo_weight_bound_lorelay_over_trl_peak_rss_above_baseline": large.get("peak_rss_above_baseline"),
    }


def cpu_time_values(results: dict) -> dict[str, float | None]:
    """The speed targets measured in process CPU time instead of wall time (a check on a busy machine)."""
    sft = results.get("sft", {}).get("ratios", {})
    return {"sft_c_over_a_reply_tokens_per_s": sft.get("c_over_a", {}).get("speedup_cpu_time"),
            "sft_c_over_b_reply_tokens_per_s": sft.get("c_over_b", {}).get("speedup_cpu_time")}


def check_targets(results: dict) -> list[dict]:
    values, cpu_values = target_values(results), cpu_time_values(results)
    checked = []
    for name, label, target, direction in TARGETS:
        value = values[name]
        entry = {"name": name, "what": label, "target": target, "direction": direction, "value": value, "met": None}
        if name in cpu_values:
            entry["value_cpu_time"] = cpu_values[name]
            if cpu_values[name] is not None:
                entry["met_cpu_time"] = cpu_values[name] >= target
        if value is not None:
            entry["met"] = value >= target if direction == "min" else value <= target
            # how far off: the fraction of the target still missing (0 when met)
            missing = (target - value) / target if direction == "min" else (value - target) / target
            entry["shortfall"] = round(max(0.0, missing), 3)
        checked.append(entry)
    return checked


SHORT = {"a": "(a) naive", "b": "(b) TRL defaults", "c": "(c) lorelay", "d": "(d) lorelay + ckpt",
         "lorelay": "lorelay (ref = adapter)", "trl": "TRL (ref = 2nd model)"}


def print_tables(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sft = results.get("sft")
    if sft:
        table = Table(title=f"SFT on CPU: {results['workload']['sft']['summary']}")
        for column in ("set-up", "step s", "reply tok/s", "real tok/s", "loss tok/s", "processed/step",
                       "padding", "peak RSS MB", "above base MB"):
            table.add_column(column, justify="right" if column != "set-up" else "left")
        for name, s in sft["setups"].items():
            table.add_row(SHORT[name], f"{s['step_time_s']:.2f}", f"{s['reply_tokens_per_s']:.1f}",
                          f"{s['real_tokens_per_s']:.1f}", f"{s['loss_tokens_per_s']:.1f}",
                          f"{s['tokens_per_step']['processed']:.0f}", f"{s['padding_fraction']:.0%}",
                          f"{s['peak_rss_mb']:.0f}", f"{s['peak_rss_above_baseline_mb']:.0f}")
        console.print(table)
        for key, r in sft["ratios"].items():
            console.print(f"  {key}: reply (loss-bearing, target) tokens/s x{r['reply_tokens_per_s']} "
                          f"(in CPU time x{r['speedup_cpu_time']}), "
                          f"real tokens/s x{r['real_tokens_per_s']}, own-loss tokens/s x{r['loss_tokens_per_s']}, "
                          f"peak RSS x{r['peak_rss']} (above baseline x{r['peak_rss_above_baseline']}); "
                          f"per round {r['speedup_per_round']}")
        if not sft["same_samples"]:
            console.print("[red]  the set-ups' batches differ in real tokens: they did not see the same samples[/red]")
    for key in ("dpo", "dpo_weight_bound"):
        if key in results:
            print_dpo_table(console, results[key], results["workload"][key]["summary"])
    table = Table(title="Targets")
    for column in ("target", "value", "in CPU time", "wanted", "met"):
        table.add_column(column)
    for t in results["targets"]:
        wanted = f"{'>=' if t['direction'] == 'min' else '<='} {t['target']}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else f"no (short {t['shortfall']:.0%})")
        cpu = t.get("value_cpu_time")
        table.add_row(t["what"], "-" if t["value"] is None else f"{t['value']:.3f}",
                      "" if cpu is None else f"{cpu:.3f}", wanted, met)
    console.print(table)


def print_dpo_table(console, dpo: dict, summary: str) -> None:
    from rich.table import Table

    table = Table(title=f"DPO on CPU: {summary}")
    for column in ("set-up", "step s", "padding", "peak RSS MB", "above base MB"):
        table.add_column(column, justify="right" if column != "set-up" else "left")
    for name, s in dpo["setups"].items():
        table.add_row(SHORT[name], f"{s['step_time_s']:.2f}", f"{s['padding_fraction']:.0%}",
                      f"{s['peak_rss_mb']:.0f}", f"{s['peak_rss_above_baseline_mb']:.0f}")
    console.print(table)
    for key, r in dpo["ratios"].items():
        console.print(f"  {key}: step time x{r['step_time']} (CPU time x{r['step_cpu_time']}), peak RSS x{r['peak_rss']} "
                      f"(above baseline x{r['peak_rss_above_baseline']}); per round {r['step_time_per_round']}")


# ----------------------------------------------------------------------------------------------

def environment() -> dict:
    import importlib.metadata

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True, check=False).stdout.strip() or None}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--setups", default="a,b,c,d", help="SFT set-ups to run, in this order each round")
    parser.add_argument("--steps", type=int, default=4, help="SFT optimizer steps per set-up (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1, help="SFT steps left out of the rates")
    parser.add_argument("--samples", type=int, default=64, help="first N chat samples of the bundled data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dpo-steps", type=int, default=3, help="DPO optimizer steps per set-up (warm-up included)")
    parser.add_argument("--dpo-warmup", type=int, default=1)
    parser.add_argument("--dpo-samples", type=int, default=64, help="first N preference pairs of the bundled data")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every set-up (interleaved: a,b,c,a,b,c)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same in every set-up")
    parser.add_argument("--skip-sft", action="store_true")
    parser.add_argument("--skip-dpo", action="store_true")
    parser.add_argument("--skip-dpo-large", action="store_true", help="skip the weight-bound DPO workload")
    parser.add_argument("--dpo-large-shape", default="smollm2-1.7b", help="its model shape (bench/dpo_bench.py SHAPES)")
    parser.add_argument("--dpo-large-samples", type=int, default=8, help="its preference pairs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one set-up may take")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--log", type=Path, default=HERE / "bench.log", help="the set-ups' own output")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse_args(argv)
    started = time.time()
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_before": loadavg(),
                     "environment": environment(), "workload": {}}
    common = ["--model", options.model, "--threads", str(options.threads)]
    options.log.parent.mkdir(parents=True, exist_ok=True)
    options.log.write_text("")
    with tempfile.TemporaryDirectory(prefix="lorelay-bench-") as tmp:
        work = Path(tmp)
        if not options.skip_sft:
            setups = [s.strip() for s in options.setups.split(",") if s.strip()]
            arguments = [*common, "--steps", str(options.steps), "--warmup", str(options.warmup),
                         "--samples", str(options.samples), "--batch-size", str(options.batch_size)]
            results["workload"]["sft"] = {
                "summary": f"first {options.samples} chat samples, batch {options.batch_size}, {options.steps} steps "
                           f"({options.warmup} warm-up), fp32, {options.threads} threads",
                "model": options.model, "samples": options.samples, "batch_size": options.batch_size,
                "steps": options.steps, "warmup_steps": options.warmup, "repeats": options.repeats}
            rounds: dict[str, list[dict]] = {s: [] for s in setups}
            print(f"SFT set-ups {','.join(setups)} x {options.repeats}", flush=True)
            for index in range(options.repeats):
                for setup in setups:
                    rounds[setup].append(run_child("sft_bench.py", ["--setup", setup, *arguments],
                                                   work / f"sft-{setup}-{index}.json", options.log, options.timeout))
            results["sft"] = sft_section(rounds)
        if not options.skip_dpo:
            summary = (f"first {options.dpo_samples} preference pairs, lorelay's DPO batch and accumulation, "
                       f"{options.dpo_steps} steps ({options.dpo_warmup} warm-up), fp32")
            results["workload"]["dpo"], results["dpo"] = run_dpo(
                options, work / "dpo", summary, model=options.model, samples=options.dpo_samples)
        if not options.skip_dpo_large:
            model = work / f"random-{options.dpo_large_shape}"
            print(f"DPO, weight-bound: building a random {options.dpo_large_shape} Llama", flush=True)
            subprocess.run([sys.executable, str(HERE / "dpo_bench.py"), "--make-model", str(model),
                            "--shape", options.dpo_large_shape], cwd=ROOT, check=True)
            summary = (f"random-weight {options.dpo_large_shape} Llama, first {options.dpo_large_samples} pairs, "
                       f"1 pair per step, {options.dpo_steps} steps ({options.dpo_warmup} warm-up), fp32")
            results["workload"]["dpo_weight_bound"], results["dpo_weight_bound"] = run_dpo(
                options, work / "dpo-large", summary, model=str(model), samples=options.dpo_large_samples,
                extra=["--batch-size", "1", "--accumulation", "1"])
    results["targets"] = check_targets(results)
    results["loadavg_after"] = loadavg()
    results["wall_s"] = round(time.time() - started, 1)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    print(f"bench: {results['wall_s']:.0f}s; load average {results['loadavg_before']} -> {results['loadavg_after']}; "
          f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
