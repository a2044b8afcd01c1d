"""A test-only stage: it writes a message N times. Registered by monkeypatching ``stages.registry.RECIPES``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from stages.core.config import field
from stages.core.modeling import Base, LoraSettings, ModelConfig
from stages.core.stage import Metric, Stage
from stages.core.training import StageOutput


@dataclasses.dataclass
class EchoConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="Base model.")
    lora: LoraSettings = field(default_factory=LoraSettings, help="Unused.")
    message: str = field("hello", help="What to write.")
    times: int = field(1, help="How often.")
    output_dir: Path = field(Path("outputs/echo"), help="Where the stage is written.")


def run(config: EchoConfig, base: Base, adapter: str | Path | None = None) -> Path:
    output = StageOutput(config.output_dir, stage="echo")
    (output.staging / "echo.txt").write_text("\n".join([config.message] * config.times) + "\n")
    metrics = {"echoes": config.times}
    output.write_json("metrics.json", metrics)
    output.commit(config=config, base=base, metrics=metrics)
    return output.output_dir


STAGE = Stage(name="echo", config_class=EchoConfig, run=run, description="Write a message several times (test stage).",
              produces_policy=False, headline=(Metric("echoes", "echo count", "{:d}"),), card_tags=("echo-test",))
