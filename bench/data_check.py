"""``lorelay data check`` against ``datasets.load_dataset("json", ...)`` reading the same file (issue 17:
no more than twice the time).

Writes a seeded file of chat rows (100k by default), then times both, each in a fresh process, in interleaved
rounds (datasets, lorelay, datasets, lorelay, ...), and prints the medians and their ratio, wall-clock and CPU
(user + system of the process and its children: lorelay's template worker counts). The datasets cache is
emptied before each of its rounds, so it converts the file to Arrow every time, as on a first read.

    python bench/data_check.py [--rows 100000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the robot mower charges docks returns warranty firmware update schedule billing account".split()


def write_rows(path: Path, count: int) -> None:
    """``count`` one-turn chats, seeded: a question of 5-25 words and a reply of 5-60."""
    pick = random.Random(0)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            question = " ".join(pick.choice(WORDS) for _ in range(pick.randint(5, 25)))
            reply = " ".join(pick.choice(WORDS) for _ in range(pick.randint(5, 60)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                  {"role": "assistant", "content": reply}]}) + "\n")


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the process and its children, stdout) of one run; a failed run stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, run.stdout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    options = parser.parse_args(argv)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    work = Path(tempfile.mkdtemp(prefix="lorelay-data-check-bench-"))
    try:
        data, cache = work / "rows.jsonl", work / "hf_cache"
        write_rows(data, options.rows)
        reader = ("import datasets; d = datasets.load_dataset('json', data_files=%r, split='train', "
                  "cache_dir=%r); print(len(d))" % (str(data), str(cache)))
        commands = {"datasets": [sys.executable, "-c", reader],
                    "lorelay": [sys.executable, "-m", "pipelines.cli", "data", "check", str(data)]}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for round_number in range(options.rounds):
            for name, command in commands.items():
                shutil.rmtree(cache, ignore_errors=True)
                wall, cpu, out = timed(command, env)
                if name == "lorelay" and "ok: everything is usable" not in out:
                    raise SystemExit(f"lorelay data check found problems in the generated rows:\n{out}")
                times[name].append((wall, cpu))
                print(f"round {round_number + 1}: {name:8s} {wall:6.2f} s wall  {cpu:6.2f} s CPU", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    medians = {name: {"wall_s": statistics.median(w for w, _ in runs), "cpu_s": statistics.median(c for _, c in runs)}
               for name, runs in times.items()}
    result = {"rows": options.rows, "rounds": options.rounds, "medians": medians,
              "ratio_wall": medians["lorelay"]["wall_s"] / medians["datasets"]["wall_s"],
              "ratio_cpu": medians["lorelay"]["cpu_s"] / medians["datasets"]["cpu_s"],
              "ratio_wall_per_round": [lorelay[0] / datasets[0] for datasets, lorelay in
                                       zip(times["datasets"], times["lorelay"])],
              "load_average": os.getloadavg()}
    print(f"medians: datasets {medians['datasets']['wall_s']:.2f} s, lorelay {medians['lorelay']['wall_s']:.2f} s "
          f"wall: {result['ratio_wall']:.2f}x (CPU {result['ratio_cpu']:.2f}x; target <= 2x); "
          f"per round {[round(r, 2) for r in result['ratio_wall_per_round']]}; load {result['load_average']}")
    if options.json:
        options.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
