"""Running one stage from the command line: ``lorelay sft --config configs/sft.yaml key=value``."""

from __future__ import annotations

import json
from pathlib import Path

from stages import registry
from stages.core.config import load_config
from stages.core.errors import LorelayError
from stages.core.stage import Stage
from stages.core.storage import check_output_dir, disk_faults
from stages.core.training import check_interrupted, stage_output_dir


def split_adapter(overrides: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``adapter=PATH`` out of the overrides: it names the incoming adapter, not a config key."""
    adapter, rest = None, []
    for item in overrides:
        if item.startswith("adapter="):
            adapter = item.partition("=")[2] or None
        else:
            rest.append(item)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise LorelayError("not an adapter directory (no adapter_config.json)", file=adapter, field="adapter")
    return adapter, rest


def run_stage_command(name: str, config_path: str | None, overrides: list[str], *, resume: bool = False,
                      restart: bool = False, help_config: bool = False) -> int:
    from stages.core.modeling import load_base

    stage = registry.get(name)
    if help_config:
        from pipelines.config_help import print_config_help

        print_config_help(stage.config_class)
        return 0
    adapter, overrides = split_adapter(list(overrides))
    if resume:
        overrides.append("training.resume=true")
    if restart:
        overrides.append("training.restart=true")
    config = load_config(stage.config_class, config_path, overrides)
    training = getattr(config, "training", None)
    output_field = "training.output_dir" if training is not None else "output_dir"
    output_dir = stage_output_dir(training.output_dir if training is not None else config.output_dir, stage.name)
    # Before the model loads, not after training: a bad directory, another run writing it, or an
    # interrupted run's checkpoints that neither --resume nor --restart says what to do with.
    check_output_dir(output_dir, field=output_field)
    if training is not None:
        check_interrupted(output_dir, resume=training.resume, restart=training.restart)
    if stage.preflight is not None:
        stage.preflight(config)  # the first rows of its data, read as the stage will
    base = load_base(config.model)
    with disk_faults(output_dir, field=output_field):
        output_dir = stage.run(config, base, adapter=adapter)
    print_stage_summary(stage, output_dir)
    return 0


def print_stage_summary(stage: Stage, output_dir: Path) -> None:
    """A final table of a finished stage's metrics, its headline metrics first."""
    from rich.console import Console
    from rich.table import Table

    metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    table = Table(title=f"{stage.name} finished: {output_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    headline = [m.key for m in stage.headline if m.key in metrics]
    for key in [*headline, *(k for k in metrics if k not in headline)]:
        value = metrics[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
