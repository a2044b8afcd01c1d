"""``make bench``'s results as ratios, targets, a terminal table and a markdown table.

Every ratio is (lorelay)/(peer) of the medians over the interleaved rounds, with the same ratio round by
round beside it (the set-ups of one round ran back to back, so a round's ratio is immune to slow drift).
"""

from __future__ import annotations

import statistics

# (name, what, target, direction, value path in results): "min" means the ratio must be at least the target.
TARGETS = [
    ("sft_c_over_a", "SFT (c)/(a) reply tokens/s, demo", 3.0, "min", ("sft", "c_over_a", "reply_tokens_per_s")),
    ("sft_c_over_t", "SFT (c)/(t) reply tokens/s, demo", 1.6, "min", ("sft", "c_over_t", "reply_tokens_per_s")),
    ("sft_long_c_over_t", "SFT (c)/(t) reply tokens/s, long replies", 1.5, "min",
     ("sft_long", "c_over_t", "reply_tokens_per_s")),
    ("sft_c_over_t_peak_rss", "SFT peak RSS (c)/(t), demo", 1.0, "max", ("sft", "c_over_t", "peak_rss")),
    ("dpo_pairs_per_s", "DPO pairs/s lorelay/TRL one-base, demo", 1.6, "min",
     ("dpo", "lorelay_over_trl-onebase", "pairs_per_s")),
    ("dpo_long_pairs_per_s", "DPO pairs/s lorelay/TRL one-base, long replies", 1.6, "min",
     ("dpo_long", "lorelay_over_trl-onebase", "pairs_per_s")),
    ("dpo_memory", "DPO peak RSS above baseline lorelay/TRL one-base, demo", 0.8, "max",
     ("dpo", "lorelay_over_trl-onebase", "peak_rss_above_baseline")),
    ("dpo_long_memory", "DPO peak RSS above baseline lorelay/TRL one-base, long replies", 0.8, "max",
     ("dpo_long", "lorelay_over_trl-onebase", "peak_rss_above_baseline")),
    ("dpo_memory_vs_two_models", "DPO peak RSS above baseline lorelay/TRL with a 2nd model, demo", 0.6, "max",
     ("dpo", "lorelay_over_trl", "peak_rss_above_baseline")),
    ("dpo_weight_bound_memory", "the same, weight-bound DPO (larger model, 1 pair per step)", 0.6, "max",
     ("dpo_weight_bound", "lorelay_over_trl", "peak_rss_above_baseline")),
]

# rate -> the token count it divides by the step time
SFT_RATES = {"reply_tokens_per_s": "reply", "real_tokens_per_s": "real", "loss_tokens_per_s": "loss",
             "processed_tokens_per_s": "processed"}
SFT_COMPARISONS = [("c", "a"), ("c", "b"), ("c", "t"), ("d", "b"), ("e", "c")]
DPO_COMPARISONS = [("lorelay", "trl-onebase"), ("lorelay", "trl")]
SHORT = {"a": "(a) naive, pad 512", "b": "(b) TRL defaults", "c": "(c) lorelay", "d": "(d) lorelay + ckpt",
         "e": "(e) lorelay + compile",          "t": "(t) TRL best", "lorelay": "lorelay (packed)", "trl-onebase": "TRL one-base (padded)",
         "trl": "TRL + 2nd model (padded)"}


def ratio(numerator, denominator):
    if numerator is None or denominator in (None, 0):
        return None
    return round(numerator / denominator, 3)


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
    details = first.get("details", {})
    if "batch_size" in details and "gradient_accumulation_steps" in details:
        pairs = details["batch_size"] * details["gradient_accumulation_steps"]
        combined["pairs_per_step"] = pairs
        combined["pairs_per_s"] = round(pairs / step, 3) if step else None
    return combined


def _memory_and_time(ours: dict, theirs: dict, rounds_ours, rounds_theirs) -> dict:
    return {"speedup_step_time": ratio(theirs["step_time_s"], ours["step_time_s"]),
            "speedup_cpu_time": ratio(theirs["step_cpu_s"], ours["step_cpu_s"]),
            "peak_rss": ratio(ours["peak_rss_mb"], theirs["peak_rss_mb"]),
            "peak_rss_above_baseline": ratio(ours["peak_rss_above_baseline_mb"], theirs["peak_rss_above_baseline_mb"]),
            "speedup_per_round": [ratio(y["step_time_s"], x["step_time_s"]) for x, y in zip(rounds_ours, rounds_theirs)]}


def sft_section(rounds: dict[str, list[dict]]) -> dict:
    setups = {name: combine(results) for name, results in rounds.items()}
    real = {name: results[0]["tokens_per_step"]["real"] for name, results in rounds.items()}
    section: dict = {"setups": setups, "ratios": {}, "same_samples": len({tuple(v) for v in real.values()}) == 1,
                     "real_tokens_each_step": real}
    for ours, other in SFT_COMPARISONS:
        if ours in setups and other in setups:
            c, o = setups[ours], setups[other]
            ratios = {rate: ratio(c[rate], o[rate]) for rate in SFT_RATES}
            ratios.update(_memory_and_time(c, o, rounds[ours], rounds[other]))
            section["ratios"][f"{ours}_over_{other}"] = ratios
    return section


def dpo_section(rounds: dict[str, list[dict]]) -> dict:
    setups = {name: combine(results) for name, results in rounds.items()}
    section: dict = {"setups": setups, "ratios": {}}
    for ours, other in DPO_COMPARISONS:
        if ours in setups and other in setups:
            ratios = {"pairs_per_s": ratio(setups[ours]["pairs_per_s"], setups[other]["pairs_per_s"])}
            ratios.update(_memory_and_time(setups[ours], setups[other], rounds[ours], rounds[other]))
            section["ratios"][f"{ours}_over_{other}"] = ratios
    return section


def check_targets(results: dict) -> list[dict]:
    checked = []
    for name, label, target, direction, (section, comparison, key) in TARGETS:
        if section not in results:
            continue
        value = results[section]["ratios"].get(comparison, {}).get(key)
        entry = {"name": name, "what": label, "target": target, "direction": direction, "value": value, "met": None}
        if value is not None:
            entry["met"] = value >= target if direction == "min" else value <= target
            # how far off: the fraction of the target still missing (0 when met)
            missing = (target - value) / target if direction == "min" else (value - target) / target
            entry["shortfall"] = round(max(0.0, missing), 3)
        checked.append(entry)
    return checked


# ----------------------------------------------------------------------------------------------
# tables: rows shared by the terminal and the markdown rendering
# ----------------------------------------------------------------------------------------------

SFT_COLUMNS = ("set-up", "step s", "reply tok/s", "processed/step", "padding", "peak RSS MB", "above base MB",
               "loss path")
DPO_COLUMNS = ("set-up", "step s", "pairs/s", "padding", "peak RSS MB", "above base MB", "batching", "loss path")


def sft_rows(section: dict) -> list[list[str]]:
    return [[SHORT[name], f"{s['step_time_s']:.2f}", f"{s['reply_tokens_per_s']:.1f}",
             f"{s['tokens_per_step']['processed']:.0f}", f"{s['padding_fraction']:.0%}", f"{s['peak_rss_mb']:.0f}",
             f"{s['peak_rss_above_baseline_mb']:.0f}", s["details"].get("loss_path", "")]
            for name, s in section["setups"].items()]


def dpo_rows(section: dict) -> list[list[str]]:
    return [[SHORT[name], f"{s['step_time_s']:.2f}", f"{s['pairs_per_s']:.2f}", f"{s['padding_fraction']:.0%}",
             f"{s['peak_rss_mb']:.0f}", f"{s['peak_rss_above_baseline_mb']:.0f}", s["details"].get("batching", ""),
             s["details"].get("loss_path", "")] for name, s in section["setups"].items()]


def target_rows(results: dict) -> list[list[str]]:
    rows = []
    for t in results["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else f"no (short {t['shortfall']:.0%})")
        rows.append([t["what"], "-" if t["value"] is None else f"{t['value']:.3f}",
                     f"{'>=' if t['direction'] == 'min' else '<='} {t['target']}", met])
    return rows


def sections(results: dict):
    """(title, columns, rows, ratio lines) of every section present."""
    for key, kind in (("sft", "SFT"), ("sft_long", "SFT"), ("dpo", "DPO"), ("dpo_long", "DPO"),
                      ("dpo_weight_bound", "DPO")):
        if key not in results:
            continue
        section = results[key]
        title = f"{kind} on CPU: {results['workload'][key]['summary']}"
        lines = []
        for name, r in section["ratios"].items():
            lead = f"pairs/s x{r['pairs_per_s']}" if "pairs_per_s" in r else f"reply tokens/s x{r['reply_tokens_per_s']}"
            lines.append(f"{name}: {lead} (CPU time x{r['speedup_cpu_time']}), peak RSS x{r['peak_rss']} "
                         f"(above baseline x{r['peak_rss_above_baseline']}); per round {r['speedup_per_round']}")
        if kind == "SFT":
            yield title, SFT_COLUMNS, sft_rows(section), lines
        else:
            yield title, DPO_COLUMNS, dpo_rows(section), lines


def print_tables(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for title, columns, rows, lines in sections(results):
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="left" if column in ("set-up", "batching", "loss path") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        for line in lines:
            console.print("  " + line)
    table = Table(title="Targets")
    for column in ("target", "value", "wanted", "met"):
        table.add_column(column)
    for row in target_rows(results):
        table.add_row(*row)
    console.print(table)


def markdown(results: dict) -> str:
    """The same tables as markdown, with the machine and its load, for docs/benchmarks/."""
    env = results["environment"]
    out = [f"# make bench, {results['date']}", "",
           f"{env['cpu']}, {results['threads']} torch threads; load average {results['loadavg_before']} before, "
           f"{results['loadavg_after']} after; {results['repeats']} interleaved rounds, medians; commit "
           f"{env['git_commit']}; versions {env['versions']}.", ""]
    if results.get("note"):
        out += [f"**{results['note']}**", ""]
    if results.get("complete") is False:
        out += ["**Partial: the run stopped before its last workload; the figures below are those it finished.**", ""]

    def table(columns, rows):
        return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(r) + " |"
                                                                                     for r in rows]
    for title, columns, rows, lines in sections(results):
        out += [f"## {title}", "", *table(columns, rows), "", *[f"- {line}" for line in lines], ""]
    out += ["## Targets", "", *table(("target", "value", "wanted", "met"), target_rows(results)), ""]
    return "\n".join(out)
