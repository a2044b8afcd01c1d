"""training.trl_args: any argument of a stage's TRL config reaches its trainer; a typo, or a key lorelay sets
itself, is refused when the config is read, naming the file, line and the closest valid key."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from stages.core.config import load_config
from stages.core.errors import ConfigError
from stages.core.modeling import ModelConfig, load_base
from stages.dpo import DPOConfig
from stages.sft import SFTConfig
from tests.conftest import write_jsonl
from tests.reliability.helpers import CHATS, sft_config, with_extra_callbacks


def write_config(tmp_path, trl_args: str, data: str = "chats.jsonl"):
    """A stage config file whose training.trl_args block starts on line 5."""
    path = tmp_path / "stage.yaml"
    path.write_text(f"data:\n  datasets: [{{path: {data}}}]\ntraining:\n  trl_args:\n{trl_args}")
    return path


@pytest.mark.parametrize("config_class, typo, meant", [
    (SFTConfig, "neftune_noise_alfa", "neftune_noise_alpha"),
    (DPOConfig, "use_weigting", "use_weighting"),
])
def test_a_misspelt_trl_argument_is_refused_with_its_line_and_the_closest_name(tmp_path, config_class, typo, meant):
    path = write_config(tmp_path, f"    dataset_num_proc: 1\n    {typo}: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_class, path)
    error = caught.value
    assert (error.file, error.line, error.field) == (str(path), 6, f"training.trl_args.{typo}")
    assert f"did you mean '{meant}'" in str(error)


def test_a_trl_argument_lorelay_sets_itself_names_the_lorelay_setting(tmp_path):
    with pytest.raises(ConfigError, match="lorelay sets learning_rate itself .*set training.learning_rate"):
        load_config(SFTConfig, write_config(tmp_path, "    learning_rate: 0.1\n"))


def test_a_trl_argument_the_stage_sets_is_refused_when_the_trainer_is_built(tmp_path):
    from trl import DPOConfig as TRLDPOConfig

    from stages.core.training import check_trl_args

    with pytest.raises(ConfigError, match="the stage sets beta from its own settings"):
        check_trl_args({"beta": 0.5}, TRLDPOConfig, stage_keys={"beta": 0.1})


def test_trl_arguments_reach_the_sft_trainer(tmp_path, tiny_model_dir, monkeypatch):
    """(The DPO trainer's: tests/stages/test_dpo.py::test_trl_args_reach_the_dpo_trainer.)"""
    seen = {}

    class ReadArgs(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(neftune=args.neftune_noise_alpha)

    from stages.sft import run

    with_extra_callbacks(monkeypatch, ReadArgs())
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS[:4])
    config = sft_config(tmp_path / "sft", data, "training.max_steps=1", "training.save_steps=null",
                        "training.trl_args={neftune_noise_alpha: 5}")
    run(config, load_base(ModelConfig(name=str(tiny_model_dir))))
    assert seen == {"neftune": 5}
