"""Running one stage from the command line: ``lorelay sft --config configs/sft.yaml key=value``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from stages.core.config import load_config
from stages.core.errors import LorelayError
from stages.core.storage import check_output_dir, disk_faults

# stage name -> (module, config class). The pipeline runner uses the same table.
STAGES = {
    "cpt": ("stages.cpt", "CPTConfig"),
    "sft": ("stages.sft", "SFTConfig"),
    "rm": ("stages.reward", "RewardConfig"),
    "dpo": ("stages.dpo", "DPOConfig"),
}


def stage_entry(name: str):
    """(module, config class) of a stage."""
    module_name, class_name = STAGES[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


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
                      help_config: bool = False) -> int:
    from stages.core.modeling import load_base

    module, config_class = stage_entry(name)
    if help_config:
        from pipelines.config_help import print_config_help

        print_config_help(config_class)
        return 0
    adapter, overrides = split_adapter(list(overrides))
    if resume:
        overrides.append("training.resume=true")
    config = load_config(config_class, config_path, overrides)
    training = getattr(config, "training", None)
    output_field = "training.output_dir" if training is not None else "output_dir"
    output_dir = Path(training.output_dir if training is not None else config.output_dir)
    check_output_dir(output_dir, field=output_field)  # before the model loads, not after training
    base = load_base(config.model)
    with disk_faults(output_dir, field=output_field):
        output_dir = module.run(config, base, adapter=adapter)
    print_stage_summary(name, output_dir)
    return 0


def print_stage_summary(name: str, output_dir: Path) -> None:
    """A final table of the headline metrics of a finished stage."""
    from rich.console import Console
    from rich.table import Table

    metrics = json.loads((Path(output_dir) / "metrics.json").read_text())
    table = Table(title=f"{name} finished: {output_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
