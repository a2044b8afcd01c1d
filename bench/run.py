"""CPU benchmark (``make bench``): lorelay's SFT and DPO against TRL at its best, side by side, as ratios.

    make bench                                   # two workloads, 3 interleaved rounds (~70 min on 2 quiet cores)
    make bench ARGS="--skip-long"                # the demo workload alone (~15 min)
    make bench ARGS="--repeats 1 --skip-long"    # a quick look
    make bench ARGS="--dpo-weight-bound"         # also the weight-bound DPO workload (a random 1.7B model)
    make bench ARGS="--skip-demo --out docs/benchmarks/cpu-long.json"   # the long-reply workload alone

Workloads: the demo's data (short replies) and a generated general-chat set with long replies
(``bench/workloads.py``). Each set-up runs in its own process (``bench/sft_bench.py``,
``bench/dpo_bench.py``), one after the other and interleaved round by round (a b c t a b c t ...), so peak
RSS is per set-up, set-ups never share the CPU, and drift hits every set-up alike; medians are reported.
Results: ``docs/benchmarks/cpu.json`` and ``docs/benchmarks/cpu.md`` (``--out``), the table on the terminal,
the set-ups' own output in ``bench/bench.log``. See ``bench/README.md`` for the definitions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from report import check_targets, dpo_section, markdown, print_tables, sft_section  # noqa: E402


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


def interleaved(script: str, setups: list[str], arguments: list[str], options, work: Path) -> dict[str, list]:
    """``--repeats`` rounds of every set-up, in order within each round: set-up -> its results by round."""
    work.mkdir(parents=True, exist_ok=True)
    rounds: dict[str, list[dict]] = {s: [] for s in setups}
    for index in range(options.repeats):
        for setup in setups:
            rounds[setup].append(run_child(script, ["--setup", setup, *arguments], work / f"{setup}-{index}.json",
                                           options.log, options.timeout))
    return rounds


def run_sft(options, work: Path, *, data: Path, setups: list[str], label: str) -> tuple[dict, dict]:
    arguments = ["--model", options.model, "--threads", str(options.threads), "--data", str(data),
                 "--steps", str(options.steps), "--warmup", str(options.warmup), "--samples", str(options.samples),
                 "--batch-size", str(options.batch_size)]
    workload = {"summary": f"{label}: first {options.samples} samples of {data.name}, batch {options.batch_size}, "
                           f"{options.steps} steps ({options.warmup} warm-up), fp32",
                "data": str(data), "model": options.model, "samples": options.samples,
                "batch_size": options.batch_size, "steps": options.steps, "warmup_steps": options.warmup}
    print(f"SFT set-ups {','.join(setups)} x {options.repeats}: {label}", flush=True)
    return workload, sft_section(interleaved("sft_bench.py", setups, arguments, options, work))


def run_dpo(options, work: Path, *, data: Path, setups: list[str], label: str, model: str | None = None,
            samples: int | None = None, extra: list[str] = ()) -> tuple[dict, dict]:
    """DPO set-ups on one workload from the same incoming adapter: the workload's description and section."""
    model = model or options.model
    samples = samples or options.dpo_samples
    work.mkdir(parents=True, exist_ok=True)
    common = ["--model", model, "--threads", str(options.threads)]
    adapter = work / "sft-adapter"
    subprocess.run([sys.executable, str(HERE / "dpo_bench.py"), "--make-adapter", str(adapter), *common],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    arguments = [*common, "--adapter", str(adapter), "--data", str(data), "--steps", str(options.dpo_steps),
                 "--warmup", str(options.dpo_warmup), "--samples", str(samples), *extra]
    workload = {"summary": f"{label}: first {samples} pairs of {data.name}, {options.dpo_steps} steps "
                           f"({options.dpo_warmup} warm-up), fp32", "data": str(data), "model": model,
                "samples": samples, "steps": options.dpo_steps, "warmup_steps": options.dpo_warmup}
    print(f"DPO set-ups {','.join(setups)} x {options.repeats}: {label}", flush=True)
    return workload, dpo_section(interleaved("dpo_bench.py", setups, arguments, options, work))


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


def write_results(results: dict, options, started: float, *, complete: bool) -> None:
    """The JSON and markdown files of the run so far (``complete`` false while workloads remain)."""
    results["complete"] = complete
    results["targets"] = check_targets(results)
    results["loadavg_after"] = loadavg()
    results["wall_s"] = round(time.time() - started, 1)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=2) + "\n")
    options.out.with_suffix(".md").write_text(markdown(results) + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--setups", default="a,b,c,t", help="SFT set-ups on the demo data, in this order each round (also: d, lorelay + "
                        "activation checkpointing; e, lorelay + training.compile)")
    parser.add_argument("--long-setups", default="c,t", help="SFT set-ups on the long-reply data")
    parser.add_argument("--dpo-setups", default="lorelay,trl-onebase,trl", help="DPO set-ups on the demo pairs")
    parser.add_argument("--long-dpo-setups", default="lorelay,trl-onebase", help="DPO set-ups on the long pairs")
    parser.add_argument("--steps", type=int, default=4, help="SFT optimizer steps per set-up (warm-up included)")
    parser.add_argument("--warmup", type=int, default=1, help="SFT steps left out of the rates")
    parser.add_argument("--samples", type=int, default=64, help="first N chat samples of each workload")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dpo-steps", type=int, default=3, help="DPO optimizer steps per set-up (warm-up included)")
    parser.add_argument("--dpo-warmup", type=int, default=1)
    parser.add_argument("--dpo-samples", type=int, default=64, help="first N preference pairs of each workload")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every set-up (medians)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same in every set-up")
    parser.add_argument("--sft-data", type=Path, default=ROOT / "data/demo/sft.jsonl")
    parser.add_argument("--dpo-data", type=Path, default=ROOT / "data/demo/preferences.jsonl")
    parser.add_argument("--skip-sft", action="store_true")
    parser.add_argument("--skip-dpo", action="store_true")
    parser.add_argument("--skip-long", action="store_true", help="skip the long-reply workload")
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo workload (e.g. to add the long one "
                                                                 "to an earlier run's figures with another --out)")
    parser.add_argument("--dpo-weight-bound", action="store_true", help="also run the weight-bound DPO workload")
    parser.add_argument("--dpo-large-shape", default="smollm2-1.7b", help="its model shape (bench/dpo_bench.py SHAPES)")
    parser.add_argument("--dpo-large-samples", type=int, default=8, help="its preference pairs")
    parser.add_argument("--note", default="", help="a line for the report, e.g. how busy the machine was")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one set-up may take")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/cpu.json",
                        help="results JSON; the markdown table goes beside it (.md)")
    parser.add_argument("--log", type=Path, default=HERE / "bench.log", help="the set-ups' own output")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    options = parse_args(argv)
    started = time.time()
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_before": loadavg(),
                     "environment": environment(), "threads": options.threads, "repeats": options.repeats,
                     "note": options.note, "workload": {}}
    options.log.parent.mkdir(parents=True, exist_ok=True)
    options.log.write_text("")
    split = lambda text: [s.strip() for s in text.split(",") if s.strip()]  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="lorelay-bench-") as tmp:
        work = Path(tmp)
        long_data = {}
        if not options.skip_long:
            from workloads import write_long_reply_workload

            long_data = write_long_reply_workload(work / "long", max(options.samples, options.dpo_samples),
                                                  options.model)
        plan = []
        if not options.skip_sft and not options.skip_demo:
            plan.append(("sft", run_sft, dict(data=options.sft_data, setups=split(options.setups), label="demo")))
        if not options.skip_sft and long_data:
            plan.append(("sft_long", run_sft, dict(data=long_data["sft"], setups=split(options.long_setups),
                                                   label="long replies")))
        if not options.skip_dpo and not options.skip_demo:
            plan.append(("dpo", run_dpo, dict(data=options.dpo_data, setups=split(options.dpo_setups), label="demo")))
        if not options.skip_dpo and long_data:
            plan.append(("dpo_long", run_dpo, dict(data=long_data["preferences"],
                                                   setups=split(options.long_dpo_setups), label="long replies")))
        if options.dpo_weight_bound:
            model = work / f"random-{options.dpo_large_shape}"
            subprocess.run([sys.executable, str(HERE / "dpo_bench.py"), "--make-model", str(model),
                            "--shape", options.dpo_large_shape], cwd=ROOT, check=True)
            plan.append(("dpo_weight_bound", run_dpo, dict(
                data=options.dpo_data, setups=["lorelay", "trl"], model=str(model),
                samples=options.dpo_large_samples, extra=["--batch-size", "1", "--accumulation", "1"],
                label=f"weight-bound, random-weight {options.dpo_large_shape} Llama, 1 pair per step")))
        for done, (key, runner, keywords) in enumerate(plan, start=1):
            results["workload"][key], results[key] = runner(options, work / key, **keywords)
            # after every workload, so a run stopped part-way keeps the figures it has
            write_results(results, options, started, complete=done == len(plan))
    print_tables(results)
    print(f"bench: {results['wall_s']:.0f}s; load average {results['loadavg_before']} -> {results['loadavg_after']}; "
          f"wrote {options.out} and {options.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
