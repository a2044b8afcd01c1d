"""A truthful stage cache: an edited data file re-runs exactly its stage and those downstream, a second
run with nothing changed reads no data file, code, library and Hub changes invalidate, the base row is
keyed on the base, and ``lorelay status`` names tampered files and the inputs that changed."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest

import pipelines.lineage as lineage
import pipelines.revisions as revisions
import stages.core.data.hash_memo as hash_memo
import stages.core.data.mixture as mixture
from pipelines.cli import main as cli
from pipelines.runner import run_pipeline
from pipelines.status import next_run
from tests.conftest import write_jsonl
from tests.pipelines.test_runner import chats, statuses, write_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "warmup_ratio": 0.0}


def sft(name: str, data: Path, **extra) -> dict:
    return {"name": name, "type": "sft", "settings": {
        "data": {"datasets": [{"path": str(data)}], "eval_ratio": 0.0, "sample_prompts": 0}, "training": TRAIN},
        **extra}


@pytest.fixture
def chain(tmp_path, tiny_model_dir, monkeypatch):
    """cpt -> sft -> sft2 with a fresh file-hash memo; a first run done."""
    monkeypatch.setenv("LORELAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hash_memo, "_memo", None)
    folder = tmp_path / "data"
    files = {"a": write_jsonl(folder / "a.jsonl", chats(8)), "b": write_jsonl(folder / "b.jsonl", chats(8))}
    (folder / "corpus").mkdir()
    (folder / "corpus" / "doc.txt").write_text("Nimbus robots sweep floors. " * 30)
    stages = [{"name": "cpt", "settings": {"data": {"sources": [{"path": str(folder / "corpus")}], "block_size": 32},
                                           "training": TRAIN}},
              sft("sft", files["a"]), sft("sft2", files["b"], init_from="sft")]
    path = write_pipeline(tmp_path, tiny_model_dir, {"tasks": "", "prompts": "", "heldout": ""}, stages, evaluation={})
    run_dir = run_pipeline(path)
    assert statuses(run_dir) == {"cpt": "done", "sft": "done", "sft2": "done"}
    return {"path": path, "run_dir": run_dir, "folder": folder, **files}


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.mark.slow
def test_a_run_reads_nothing_unchanged_and_reruns_what_an_edit_touches(chain, monkeypatch, tmp_path, capsys):
    run_dir, folder = chain["run_dir"], chain["folder"]
    monkeypatch.setattr(hash_memo, "_memo", None)  # as a new process: the memo comes from disk
    hashed, opened = [], []
    real_read, real_open = mixture.read_sha256, builtins.open
    monkeypatch.setattr(mixture, "read_sha256", lambda path: hashed.append(path) or real_read(path))

    def watching_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).resolve().is_relative_to(folder.resolve()):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watching_open)
    run_pipeline(chain["path"])
    assert statuses(run_dir) == {"cpt": "cached", "sft": "cached", "sft2": "cached"}
    assert not hashed and not opened, f"an unchanged run read data files: {hashed + opened}"
    monkeypatch.setattr(builtins, "open", real_open)

    write_jsonl(chain["b"], chats(9))  # sft2's data only
    assert next_run(run_json(run_dir), run_dir) == {"cpt": [], "sft": [], "sft2": [f"data file {chain['b']} changed"]}
    run_pipeline(chain["path"])
    assert statuses(run_dir) == {"cpt": "cached", "sft": "cached", "sft2": "done"}
    assert [Path(p).name for p in hashed] == ["b.jsonl"] * len(hashed) and hashed, "only the edited file is re-hashed"

    write_jsonl(chain["a"], chats(9))  # sft's data: sft and sft2 (downstream) re-run
    run_pipeline(chain["path"])
    assert statuses(run_dir) == {"cpt": "cached", "sft": "done", "sft2": "done"}

    # ---- lorelay's code and the libraries are in the keys; status says what changed --------------------
    copy = tmp_path / "stages-copy"
    shutil.copytree(revisions.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(revisions, "PACKAGE_ROOT", copy)
    assert next_run(run_json(run_dir), run_dir) == {"cpt": [], "sft": [], "sft2": []}

    with open(copy / "sft.py", "a") as handle:
        handle.write("# an edit\n")
    plan = next_run(run_json(run_dir), run_dir)
    assert plan["cpt"] == [] and plan["sft"] == ["lorelay's code changed"]
    assert sorted(plan["sft2"]) == ["an upstream stage changed", "lorelay's code changed"]

    real_versions = revisions.library_versions()
    monkeypatch.setattr(lineage, "library_versions", lambda: {**real_versions, "trl": "99.0"})
    assert f"library trl {real_versions['trl']} -> 99.0" in next_run(run_json(run_dir), run_dir)["cpt"]

    # ---- status names tampered and missing files ---------------------------------------------------------
    (run_dir / "sft" / "metrics.json").write_text("{}")
    (run_dir / "cpt" / "adapter_model.safetensors").unlink()
    assert cli(["status", str(run_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "checksum mismatch for metrics.json" in out and "missing: adapter_model.safetensors" in out
    assert run_json(run_dir)["stages"][0]["key"][:12] in out and "library trl" in out


def test_hub_datasets_are_keyed_by_the_commit_they_resolve_to(monkeypatch, tmp_path):
    from stages.sft import SFTConfig
    from stages.core.config import load_config

    config = load_config(SFTConfig, None, ["data.datasets=[{path: 'someone/tickets@main'}]"])
    commits = {"someone/tickets": "a" * 40}
    monkeypatch.setattr(lineage, "resolve_revision", lambda repo, revision, kind: commits[repo])
    first = lineage.cache_inputs("sft", config, [], "base", tmp_path)
    assert first["hub"] == {"someone/tickets@main": "a" * 40}
    commits["someone/tickets"] = "b" * 40  # main moved
    second = lineage.cache_inputs("sft", config, [], "base", tmp_path)
    assert lineage.cache_key(first) != lineage.cache_key(second)
    assert lineage.changed_inputs(first, second) == ["Hub dataset someone/tickets@main changed"]


def test_a_revision_resolves_from_the_hub_or_the_local_cache(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, constants

    revisions.resolve_revision.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo, repo_type, revision: type("Info", (), {"sha": "c" * 40}))
    assert revisions.resolve_revision("org/model", "main", "model") == "c" * 40
    revisions.resolve_revision.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "datasets--org--data" / "refs").mkdir(parents=True)
    (tmp_path / "datasets--org--data" / "refs" / "main").write_text("d" * 40)
    assert revisions.resolve_revision("org/data", None, "dataset") == "d" * 40
    assert revisions.resolve_revision("org/other", "v1", "dataset") == "unresolved:org/other@v1"
    assert revisions.resolve_revision("org/x", "e" * 40, "model") == "e" * 40
    revisions.resolve_revision.cache_clear()


def test_the_base_row_is_re_evaluated_for_another_base(tiny_model_dir, tmp_path):
    from rich.console import Console
    from safetensors.torch import load_file, save_file

    from pipelines.evaluate import Evaluator
    from pipelines.plan import EvaluationConfig
    from stages.core.modeling import ModelConfig, load_base

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(other / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "Route: billing?", "answer": "billing"}])
    config = EvaluationConfig(tasks=tasks, task_max_new_tokens=2)
    first = Evaluator(config, load_base(ModelConfig(name=str(tiny_model_dir))), tmp_path / "run", Console(quiet=True))
    row = first.policy("base", None, None)
    assert first.policy("base", None, row) is row, "same base, same files: the row is re-used"
    second = Evaluator(config, load_base(ModelConfig(name=str(other))), tmp_path / "run", Console(quiet=True))
    assert second.policy("base", None, row)["config_hash"] != row["config_hash"], "another base: re-evaluated"


def test_run_restart_discards_an_interrupted_stage_instead_of_resuming_it(tmp_path, tiny_model_dir):
    from pipelines.plan import load_pipeline, resolve_stage

    data = write_jsonl(tmp_path / "a.jsonl", chats(4))
    path = write_pipeline(tmp_path, tiny_model_dir, {"tasks": "", "prompts": "", "heldout": ""}, [sft("sft", data)],
                          evaluation={})
    (tmp_path / "run" / "sft.partial" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    pipeline, _ = load_pipeline(path, [])
    resumed = resolve_stage(pipeline, 0, [], {}, "base")
    restarted = resolve_stage(pipeline, 0, [], {}, "base", restart=True)
    assert (resumed.config.training.resume, resumed.config.training.restart) == (True, False)
    assert (restarted.config.training.resume, restarted.config.training.restart) == (False, True)
    assert resumed.key == restarted.key, "how a stage starts is not part of what it produces"
