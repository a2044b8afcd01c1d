"""The run report: ``report.md`` with one metrics table across stages, PNG plots, sample replies.

Also the rich summary table printed at the end of ``lorelay run`` and by ``lorelay status``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from stages import registry
from stages.core.stage import Metric
from stages.core.training import is_main_process

# What pipelines/evaluate.py measures on every policy; each stage's own columns come from its STAGE.headline.
EVALUATION_COLUMNS = (Metric("task_accuracy", "task acc", "{:.1%}"), Metric("heldout_perplexity", "ppl", "{:.2f}"))
# Win rates against the parent: program checks and the configured judge (no stage trained against either), then
# the trained reward model's opinion.
WIN_COLUMNS = (Metric("check_win_rate_vs_parent", "checks won", "{:.1%}"),
               Metric("check_loss_rate_vs_parent", "checks lost", "{:.1%}"),
               Metric("judge_win_rate_vs_parent", "judge won", "{:.1%}"),
               Metric("judge_loss_rate_vs_parent", "judge lost", "{:.1%}"),
               Metric("rm_win_rate_vs_parent", "RM says won", "{:.1%}"),
               Metric("rm_loss_rate_vs_parent", "RM says lost", "{:.1%}"))


def columns(run: dict[str, Any]) -> list[Metric]:
    """The evaluation columns with one pass rate per configured check (``NAME_rate``), the headline metrics of
    the run's stage types (registry), then win rates."""
    found = [*EVALUATION_COLUMNS, *(Metric(f"{name}_rate", name.replace("_", " "), "{:.1%}")
                                    for name in run.get("checks", []))]
    for stage_type in dict.fromkeys(s.get("type") for s in run.get("stages", [])):
        stage = registry.find(stage_type)
        found += [m for m in (stage.headline if stage else ()) if m.key not in {c.key for c in found}]
    return found + [*WIN_COLUMNS]


def rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per policy or stage: name, type, status, seconds and every metric we know about."""
    table = []
    base_eval = (run.get("base_evaluation") or {}).get("metrics", {})
    table.append({"name": "base", "type": "base", "status": "-", "seconds": None, "parent": "",
                  "metrics": base_eval})
    for stage in run.get("stages", []):
        metrics = {**stage.get("metrics", {}), **(stage.get("evaluation") or {}).get("metrics", {})}
        table.append({"name": stage["name"], "type": stage["type"], "status": stage.get("status", "?"),
                      "seconds": stage.get("seconds"), "parent": stage.get("init_from") or "base",
                      "metrics": metrics})
    return table


def duration(row: dict[str, Any]) -> str:
    return f"{row['seconds']:.0f}s" if row["seconds"] is not None else ""


def summary_table(run: dict[str, Any]):
    """The terminal table: columns no stage has a value for are left out, so it fits 80 columns."""
    from rich import box
    from rich.table import Table

    table_rows, metrics = rows(run), columns(run)
    short = {"{:.1%}": "{:.0%}", "{:.3f}": "{:.2f}", "{:.2f}": "{:.1f}"}  # a terminal is narrower than a page
    metrics = [dataclasses.replace(m, format=short.get(m.format, m.format)) for m in metrics]
    cells = [[m.render(row["metrics"].get(m.key)) for m in metrics] for row in table_rows]
    shown = [i for i in range(len(metrics)) if any(values[i] for values in cells)]
    show_type = any(row["name"] != row["type"] for row in table_rows)
    table = Table(title=f"run {run.get('name')}: {len(run.get('stages', []))} stages, policy = {run.get('policy')}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table_columns = [("stage", [r["name"] for r in table_rows])]
    table_columns += [("type", [r["type"] for r in table_rows])] if show_type else []
    table_columns += [("status", [r["status"] for r in table_rows]),
                      ("time", [duration(r) for r in table_rows])]
    table_columns += [(metrics[i].title.replace(" ", "\n"), [values[i] for values in cells]) for i in shown]
    for title, values in table_columns:
        # values never wrap (a header may): each column is at least as wide as its widest value
        table.add_column(title, justify="left" if title in ("stage", "type", "status") else "right",
                         min_width=max(len(v) for v in values))
    for index in range(len(table_rows)):
        table.add_row(*[values[index] for _, values in table_columns])
    return table


def markdown_table(run: dict[str, Any]) -> str:
    metrics = columns(run)
    header = ["stage", "type", "parent", "status", "time", *[m.title for m in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows(run):
        values = [row["name"], row["type"], row["parent"], row["status"], duration(row),
                  *[m.render(row["metrics"].get(m.key)) for m in metrics]]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def _is_policy(stage_type: str) -> bool:
    stage = registry.find(stage_type)
    return bool(stage and stage.produces_policy)


def loss_curves(run_dir: Path, run: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for stage in run.get("stages", []):
        metrics_file = run_dir / stage["output_dir"] / "metrics.json"
        if not metrics_file.exists():
            continue
        history = json.loads(metrics_file.read_text()).get("log_history", [])
        points = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
        if points:
            curves[stage["name"]] = points
    if not curves:
        return False
    figure, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for axis, (name, points) in zip(axes[0], curves.items()):
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.set_ylabel("train loss")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


RL_PANELS = (("reward", "mean reward per function"), ("length", "completion length (tokens)"),
             ("ratios", "truncated / clipped ratio, KL"))


def reward_curves(run_dir: Path, run: dict[str, Any], path: Path) -> bool:
    """For each RL stage (a ``train_history`` with per-reward means, as GRPO writes): rewards, lengths, ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {}
    for stage in run.get("stages", []):
        metrics_file = run_dir / stage["output_dir"] / "metrics.json"
        history = json.loads(metrics_file.read_text()).get("train_history", []) if metrics_file.exists() else []
        if any(key.startswith("reward_") for row in history for key in row):
            histories[stage["name"]] = history
    if not histories:
        return False
    figure, axes = plt.subplots(len(histories), len(RL_PANELS), figsize=(13, 3 * len(histories)), squeeze=False)
    for row_axes, (name, history) in zip(axes, histories.items()):
        steps = [row["step"] for row in history]
        series = {"reward": sorted({k for row in history for k in row if k.startswith("reward_")}),
                  "length": ["completion_length"], "ratios": ["truncated_ratio", "clipped_ratio", "kl"]}
        for axis, (panel, title) in zip(row_axes, RL_PANELS):
            for key in series[panel]:
                values = [row.get(key) for row in history]
                if any(v is not None for v in values):
                    axis.plot(steps, values, marker=".", label=key.removeprefix("reward_"))
            axis.set_title(f"{name}: {title}")
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def metrics_by_stage(run: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policy_rows = [r for r in rows(run) if r["type"] == "base" or _is_policy(r["type"])]
    series = {"task accuracy": [r["metrics"].get("task_accuracy") for r in policy_rows],
              "checks: win rate vs parent": [r["metrics"].get("check_win_rate_vs_parent") for r in policy_rows],
              **{f"{name} rate": [r["metrics"].get(f"{name}_rate") for r in policy_rows]
                 for name in run.get("checks", [])}}
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    if not series:
        return False
    figure, axis = plt.subplots(figsize=(1.6 * len(policy_rows) + 2, 3))
    width = 0.8 / len(series)
    for offset, (label, values) in enumerate(series.items()):
        xs = [i + offset * width for i in range(len(policy_rows))]
        axis.bar(xs, [v or 0 for v in values], width=width, label=label)
    axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(policy_rows))])
    axis.set_xticklabels([r["name"] for r in policy_rows])
    axis.set_ylim(0, 1)
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def sample_replies(run_dir: Path, run: dict[str, Any], count: int = 4) -> str:
    eval_dir = run_dir / "eval"
    policies = ["base"] + [s["name"] for s in run.get("stages", []) if s.get("evaluation")]
    replies = {p: json.loads((eval_dir / f"{p}.json").read_text()) for p in policies if (eval_dir / f"{p}.json").exists()}
    if not replies:
        return ""
    first = next(iter(replies.values()))
    blocks = []
    for i, row in enumerate(first[:count]):
        block = [f"**Prompt:** {row['prompt']}", ""]
        for name, rows_ in replies.items():
            reply = rows_[i]["reply"].replace("\n", " ") if i < len(rows_) else ""
            block.append(f"- *{name}*: {reply}")
        blocks.append("\n".join(block))
    return "\n\n".join(blocks)


def write_report(run_dir: Path, run: dict[str, Any], console=None) -> Path:
    """Write report.md and plots; print the summary table."""
    run_dir = Path(run_dir)
    if console is not None:
        console.print(summary_table(run))
    if not is_main_process():
        return run_dir / "report.md"
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    parts = [f"# lorelay run `{run.get('name')}`", "",
             f"Base model: `{run['base']['name']}` ({run['base']['quantization']}, {run['base']['dtype']}, "
             f"{run['base']['device']}). Final policy: `{run.get('policy')}`. lorelay {run.get('lorelay_version')}, "
             f"commit `{run.get('git_commit') or 'n/a'}`. Updated {run.get('updated')}.", "",
             "## Metrics after each stage", "", markdown_table(run), "",
             "Task acc: exact match on held-out prompts. ppl: held-out perplexity. RM acc: the reward model scores "
             "the chosen reply above the rejected one on held-out pairs. DPO acc: the same for DPO's implicit reward. "
             + (f"Check columns ({', '.join(run['checks'])}): share of replies to the held-out prompts that pass "
                "the check, among those it applies to. " if run.get("checks") else "")
             + "Win rates compare each policy's reply with its parent's on the same held-out prompt (ties are the "
             "rest). Checks won/lost: the reply passing more of the applicable program checks wins. Judge won/lost: "
             "the configured independent judge, asked in both orders (a tie when they disagree). RM says won/lost: "
             "the trained reward model's opinion; a stage that learned from pairs it picked has learned to please it.",
             ""]
    if loss_curves(run_dir, run, plots / "loss_curves.png"):
        parts += ["## Loss curves", "", "![loss curves](plots/loss_curves.png)", ""]
    if reward_curves(run_dir, run, plots / "reward_curves.png"):
        parts += ["## Rewards during RL (GRPO)", "", "Mean of each reward over the sampled replies of each step "
                  "(before weighting), reply length, the share of replies cut at max_completion_length, the share of "
                  "tokens whose ratio was clipped, and the KL to the reference when beta > 0.", "",
                  "![reward curves](plots/reward_curves.png)", ""]
    if metrics_by_stage(run, plots / "metrics_by_stage.png"):
        parts += ["## Metrics by stage", "", "![metrics by stage](plots/metrics_by_stage.png)", ""]
    samples = sample_replies(run_dir, run)
    if samples:
        parts += ["## Sample generations (greedy, held-out prompts)", "", samples, ""]
    gates = [(s["name"], s["gates"]) for s in run.get("stages", []) if s.get("gates")]
    if gates:
        parts += ["## Gates", ""] + [f"- {name}: {g if isinstance(g, str) else '; '.join(g)}" for name, g in gates] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    if console is not None:
        console.print(f"report: {path}")
    return path
