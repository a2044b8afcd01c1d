"""What TRL's preference trainers report, in lorelay's words: headline metrics, train history, lengths kept."""

from __future__ import annotations

from stages.core import compat

# TRL's logged metric -> our name in metrics.json (prefixed eval_ / train_).
HEADLINE = {
    "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
    "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected",
    "kl": "kl", "nll_loss": "nll_loss", "log_odds_ratio": "log_odds_ratio",
}


def eval_metrics(logged: dict[str, float]) -> dict[str, float]:
    metrics = {"eval_loss": logged.get("eval_loss")}
    metrics.update({f"eval_{ours}": logged[f"eval_{theirs}"] for theirs, ours in HEADLINE.items()
                    if f"eval_{theirs}" in logged})
    return metrics


def final_train_metrics(log_history: list[dict]) -> dict[str, float]:
    last = next((entry for entry in reversed(log_history) if "loss" in entry), {})
    return {f"train_{ours}": last[theirs] for theirs, ours in HEADLINE.items() if theirs in last}


def train_history(log_history: list[dict]) -> list[dict]:
    """Per logged step: loss and the preference metrics (reward accuracy, margin, chosen/rejected log-probs)."""
    return [{"step": entry["step"], "loss": entry["loss"],
             **{ours: entry[theirs] for theirs, ours in HEADLINE.items() if theirs in entry}}
            for entry in log_history if "loss" in entry]


def length_report(dataset, examples: int, max_length: int | None) -> dict[str, int | None]:
    """How many examples TRL kept, and how many it will cut at max_length (it drops or cuts silently).

    ``truncated`` is None where the trainer's columns do not show it (ORPO tokenizes and cuts in its own way).
    """
    if dataset is None:
        return {"examples": examples, "used": 0, "dropped_prompt_too_long": 0, "truncated": 0}
    report: dict[str, int | None] = {"examples": examples, "used": len(dataset),
                                     "dropped_prompt_too_long": max(0, examples - len(dataset)), "truncated": None}
    prompt = compat.PROMPT_IDS
    sides = [c for c in compat.COMPLETION_IDS if c in dataset.column_names]
    if max_length is None:
        report["truncated"] = 0
    elif prompt in dataset.column_names and sides and len(dataset):
        import pyarrow.compute as pc

        table = dataset.select_columns([prompt, *sides]).with_format("arrow")[:]
        longest = pc.list_value_length(table[prompt])
        for side in sides:
            longest_side = pc.add(pc.list_value_length(table[prompt]), pc.list_value_length(table[side]))
            longest = pc.max_element_wise(longest, longest_side)
        report["truncated"] = int(pc.sum(pc.greater(longest, max_length)).as_py() or 0)
    return report
