"""Gates: conditions on a stage's metrics (``task_accuracy >= parent.task_accuracy``) that stop a pipeline."""

from __future__ import annotations

import re
from typing import Any

from stages.core.errors import ConfigError, LorelayError, did_you_mean

GATE = re.compile(r"^\s*([A-Za-z_][\w./]*)\s*(>=|<=|>|<|==)\s*(parent\.[\w./]+|[-+0-9.eE]+)\s*$")
OPERATORS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
             "<": lambda a, b: a < b, "==": lambda a, b: a == b}


class GateFailed(LorelayError):
    """A stage's gate did not hold: the pipeline stops before the next stage."""


def check_gates(stage: str, gates: list[str], metrics: dict[str, Any], parent_metrics: dict[str, Any] | None) -> list[str]:
    """The gates that hold, as readable lines; raises GateFailed on the first that does not."""
    passed = []
    for gate in gates:
        match = GATE.match(gate)
        if not match:
            raise ConfigError(f"gate '{gate}' is not of the form 'metric OP number|parent.metric'",
                              field=f"{stage}.gates")
        name, op, target = match.groups()
        if name not in metrics:
            raise GateFailed(f"stage '{stage}': gate '{gate}' names metric '{name}', which the stage did not report",
                             hint=did_you_mean(name, metrics) or f"available: {', '.join(sorted(metrics))}")
        if target.startswith("parent."):
            parent_name = target.removeprefix("parent.")
            if not parent_metrics or parent_name not in parent_metrics:
                raise GateFailed(f"stage '{stage}': gate '{gate}' needs the parent's '{parent_name}', which is missing")
            bound = parent_metrics[parent_name]
        else:
            bound = float(target)
        value = metrics[name]
        if not OPERATORS[op](value, bound):
            raise GateFailed(f"stage '{stage}' failed its gate '{gate}': {name} = {value:.4g}, needed {op} {bound:.4g}",
                             hint="the pipeline stopped here; later stages did not run")
        passed.append(f"{name} {value:.4g} {op} {bound:.4g}")
    return passed

