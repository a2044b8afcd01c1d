"""The model card (README.md) that ``lorelay push`` and ``lorelay merge`` write.

A card has two parts. The YAML metadata block is what the Hub indexes: ``base_model`` (a Hub id, never
a local path), ``library_name`` (peft for an adapter, transformers for merged weights), ``license``
(carried from the base model), ``datasets`` (Hub ids only) and ``tags``. The body says what the model
is (its stage lineage with per-stage metrics), how to reproduce it (``lorelay_config.yaml``) and how to
load it.

Everything here is read from files already on disk: a stage's ``manifest.json``, a run's ``run.json``,
the base model's README/config (or its copy in the local Hugging Face cache). Nothing touches the
network, so ``--dry-run`` can show the card exactly as it will be uploaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData

from stages import __version__, registry
from stages.core.default_model import DEFAULT_MODEL

# The embedded model is SmolLM2-135M-Instruct (dequantised from a Q4_1 GGUF): cards point at the
# original checkpoint, to which the adapter applies as a QLoRA adapter applies to its full-precision base.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
EMBEDDED_NAMES = (DEFAULT_MODEL, "embedded")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# The lineage table shows train_loss, each stage type's headline metrics (its STAGE.headline), steps,
# then any other scalar metric, up to MAX_METRIC_COLUMNS.
MAX_METRIC_COLUMNS = 8
_NOT_METRICS = ("runtime", "parameters", "seconds")


# ----------------------------------------------------------------------------------------------
# facts about the base model and the data
# ----------------------------------------------------------------------------------------------

def is_reward_model(manifest: dict[str, Any]) -> bool:
    """Whether the manifest's stage type produces a reward model (a score head, not a causal LM)."""
    stage = registry.find(manifest.get("stage"))
    return bool(stage and stage.produces_reward_model)


def is_embedded(name: str) -> bool:
    return name in EMBEDDED_NAMES


def base_hub_id(manifest: dict[str, Any]) -> str | None:
    """The base model's Hub id, or None when it was a local directory (which the Hub cannot link to)."""
    name = str(manifest.get("base_model", {}).get("name", ""))
    if is_embedded(name):
        return EMBEDDED_HUB_ID
    if not name or Path(name).expanduser().exists() or not _HUB_ID.fullmatch(name):
        return None
    return name


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a README (``huggingface_hub.ModelCard``), or {} when there is none
    or it is broken."""
    from huggingface_hub import ModelCard

    try:
        return ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, yaml.YAMLError):
        return {}


def _license_in(readme: Path | None, config: Path | None) -> str | None:
    if readme is not None and readme.is_file():
        found = read_front_matter(readme.read_text(encoding="utf-8", errors="replace")).get("license")
        if isinstance(found, list) and found:
            found = found[0]
        if isinstance(found, str) and found.strip():
            return found.strip()
    if config is not None and config.is_file():
        try:
            found = json.loads(config.read_text()).get("license")
        except (json.JSONDecodeError, AttributeError):
            found = None
        if isinstance(found, str) and found.strip():
            return found.strip()
    return None


def base_license(manifest: dict[str, Any]) -> str | None:
    """The base model's license: from its README metadata (or config.json) on disk, else unknown.

    A local base is read from its directory; a Hub base from the local Hugging Face cache only (a
    card is built without network access). None means unknown: the card then omits ``license``
    rather than guess one.
    """
    base = manifest.get("base_model", {})
    name = str(base.get("name", ""))
    if is_embedded(name):
        return EMBEDDED_LICENSE
    for candidate in (base.get("path"), name):
        if candidate and Path(str(candidate)).expanduser().is_dir():
            folder = Path(str(candidate)).expanduser()
            found = _license_in(folder / "README.md", folder / "config.json")
            if found:
                return found
    hub_id = base_hub_id(manifest)
    if hub_id is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    revision = (manifest.get("config", {}).get("model") or {}).get("revision")
    paths = []
    for filename in ("README.md", "config.json"):
        cached = try_to_load_from_cache(hub_id, filename, revision=revision)
        paths.append(Path(cached) if isinstance(cached, str) else None)
    return _license_in(*paths)


def hub_datasets(manifests: list[dict[str, Any]]) -> list[str]:
    """Hub dataset ids the stages trained on (manifest data entries recorded as ``hub:<id>``)."""
    found: list[str] = []
    for manifest in manifests:
        for value in (manifest.get("data") or {}).values():
            if isinstance(value, str) and value.startswith("hub:") and value[4:] not in found:
                found.append(value[4:])
    return found


def local_datasets(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(file name, short sha256) of the local data files a stage trained on."""
    rows = []
    for path, value in (manifest.get("data") or {}).items():
        if isinstance(value, str) and not value.startswith("hub:"):
            rows.append((Path(path).name, value[:12]))
    return rows


# ----------------------------------------------------------------------------------------------
# lineage
# ----------------------------------------------------------------------------------------------

def lineage(manifest: dict[str, Any], stage_name: str, run_info: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per stage: name, type, init_from, status, seconds, metrics.

    For a run, every stage of ``run.json`` in its order; for a lone stage directory, that stage only.
    """
    if run_info and run_info.get("stages"):
        return [{"name": s.get("name"), "type": s.get("type"), "init_from": s.get("init_from"),
                 "status": s.get("status"), "seconds": s.get("seconds"), "metrics": s.get("metrics") or {}}
                for s in run_info["stages"]]
    return [{"name": stage_name, "type": manifest.get("stage"),
             "init_from": manifest.get("init_from") or manifest.get("adapter"),
             "status": "done", "seconds": (manifest.get("timings") or {}).get("total"),
             "metrics": manifest.get("metrics") or {}}]


def weight_chain(rows: list[dict[str, Any]], policy: str) -> list[dict[str, Any]]:
    """The stages whose weights the policy carries: follow ``init_from`` back from the policy."""
    by_name = {row["name"]: row for row in rows}
    chain, name = [], policy
    while name in by_name and by_name[name] not in chain:
        chain.append(by_name[name])
        name = by_name[name].get("init_from")
    return list(reversed(chain))


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    present: list[str] = []
    for row in rows:
        for key, value in row["metrics"].items():
            if _scalar(value) and key not in present and not any(word in key for word in _NOT_METRICS):
                present.append(key)
    headline = [m.key for row in rows for m in getattr(registry.find(row.get("type")), "headline", ())]
    preferred = [key for key in dict.fromkeys(["train_loss", *headline, "steps"]) if key in present]
    return (preferred + sorted(k for k in present if k not in preferred))[:MAX_METRIC_COLUMNS]


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def lineage_table(rows: list[dict[str, Any]]) -> str:
    columns = metric_columns(rows)
    header = ["stage", "type", "started from", "status", "seconds", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"], row["type"], row.get("init_from") or "base", row.get("status"), row.get("seconds"),
                 *(row["metrics"].get(c) for c in columns)]
        lines.append("| " + " | ".join(_format(c) for c in cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the files that go next to the card
# ----------------------------------------------------------------------------------------------

def reproducible_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's resolved stage config, with the base model it really ran on.

    Inside a pipeline a stage shares the pipeline's base, whatever its own ``model.name`` said; the
    manifest's ``base_model`` records the one used.
    """
    config = json.loads(json.dumps(manifest.get("config") or {}))
    base = manifest.get("base_model") or {}
    if isinstance(config.get("model"), dict) and base.get("name"):
        config["model"]["name"] = base["name"]
    return config


def config_yaml(manifest: dict[str, Any]) -> str:
    stage = manifest.get("stage", "sft")
    header = (f"# lorelay {stage} config that produced this model (resolved: every default written out).\n"
              f"# Reproduce: lorelay {stage} --config lorelay_config.yaml")
    if manifest.get("init_from") or (manifest.get("metrics") or {}).get("init_from"):  # it continued an adapter
        header += " adapter=PATH_TO_INCOMING_ADAPTER"
    header += "\n# Data paths are the trainer's own; point data.* at your copies.\n"
    return header + yaml.safe_dump(reproducible_config(manifest), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------

def card_metadata(manifest: dict[str, Any], *, rows: list[dict[str, Any]], merged: bool,
                  manifests: list[dict[str, Any]] | None = None) -> ModelCardData:
    """The card's YAML metadata, the fields the Hub indexes (``huggingface_hub.ModelCardData``)."""
    stage_types = [row["type"] for row in rows if row.get("type")]
    tags = ["lorelay", "trl", "lora"]
    for stage_type in stage_types:
        for tag in [stage_type, *getattr(registry.find(stage_type), "card_tags", ())]:
            if tag not in tags:
                tags.append(tag)
    method = (manifest.get("config") or {}).get("method")
    if isinstance(method, str) and method not in tags:
        tags.append(method)
    if merged:
        tags.append("merged")
    hub_id = base_hub_id(manifest)
    return ModelCardData(
        base_model=hub_id, base_model_relation=("finetune" if merged else "adapter") if hub_id else None,
        library_name="transformers" if merged else "peft", license=base_license(manifest),
        datasets=hub_datasets(manifests or [manifest]) or None,
        pipeline_tag="text-classification" if is_reward_model(manifest) else "text-generation", tags=tags)


def _chat_snippet(repo: str, model_class: str, module: str) -> str:
    """Python that loads ``repo`` with ``module.model_class`` and answers one chat message."""
    imports = (f"from transformers import {model_class}, AutoTokenizer" if module == "transformers"
               else f"from {module} import {model_class}\nfrom transformers import AutoTokenizer")
    return f"""```python
{imports}

model = {model_class}.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
messages = [{{"role": "user", "content": "Hello!"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def _usage(repo: str, *, merged: bool, reward: bool) -> str:
    name = repo.rsplit("/", 1)[-1]
    if merged:
        return f"""## How to use

The adapter is merged into the base weights: this is an ordinary transformers checkpoint, ready for
serving engines that want one model (e.g. `vllm serve {repo}`).

{_chat_snippet(repo, "AutoModelForCausalLM", "transformers")}"""
    if reward:
        return f"""## How to use

A reward-model adapter (LoRA plus a score head, saved with the adapter). Score conversations with
lorelay after downloading it:

```bash
hf download {repo} --local-dir {name}
```

```python
from stages.core.modeling import ModelConfig, load_base
from stages.core.scoring import reward_model, score

base = load_base(ModelConfig(name="BASE_MODEL"))
with reward_model(base, "{name}") as model:
    conversation = [{{"role": "user", "content": "Hi"}}, {{"role": "assistant", "content": "Hello!"}}]
    print(score(model, base.tokenizer, [conversation]))
```
"""
    return f"""## How to use

With transformers and PEFT (the base model is downloaded from `base_model_name_or_path` in
`adapter_config.json`):

{_chat_snippet(repo, "AutoPeftModelForCausalLM", "peft")}
With lorelay:

```bash
hf download {repo} --local-dir {name}
lorelay chat {name}
```

`model = model.merge_and_unload()` folds the adapter into the base weights; `lorelay merge` does the
same from a stage directory.
"""


def merge_sentence(merge: dict[str, Any] | None, quantization: str | None) -> str:
    """How the merge was made and how faithful it is to the adapter as it was trained and evaluated."""
    if merge is None:  # a dry run: the merge happens at upload
        trained = f"a {quantization}-quantised base (QLoRA)" if quantization not in (None, "none") else "its base"
        return f"The adapter was trained on {trained}; the merge is measured against it when it is made.\n"
    into = ("the quantised base's weights dequantised to the compute dtype, the very values the adapter trained "
            "against" if merge["merge_base"] == "dequantized" else "the original full-precision base weights")
    return (f"Merged into {into}. Largest logit difference from the adapter on the base as trained "
            f"({merge['reference']}), on {merge['prompts']} fixed prompts: {merge['max_logit_diff']:.3g} "
            f"(logits up to {merge['logit_scale']:.3g}).\n")


def render_card(manifest: dict[str, Any], *, repo: str, stage_name: str, run_info: dict[str, Any] | None = None,
                merged: bool = False, manifests: list[dict[str, Any]] | None = None) -> str:
    """README.md for ``repo``: YAML metadata, lineage with metrics, reproduction, usage."""
    rows = lineage(manifest, stage_name, run_info)
    policy = (run_info or {}).get("policy") or stage_name
    chain = weight_chain(rows, policy) or rows
    meta = card_metadata(manifest, rows=chain, merged=merged, manifests=manifests)
    base = manifest.get("base_model") or {}
    base_name = str(base.get("name", "unknown"))
    hub_id = meta.get("base_model")
    base_ref = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{Path(base_name).name}` (a local model)"
    kind = "Full weights: a LoRA adapter merged into" if merged else "A LoRA adapter for"
    steps = " → ".join(["base", *(row["name"] for row in chain)])

    parts = ["---", meta.to_yaml(), "---", ""]
    parts.append(f"# {repo.rsplit('/', 1)[-1]}\n")
    parts.append(f"{kind} {base_ref}, trained with lorelay (TRL + PEFT): {steps}.\n")
    if is_embedded(base_name):
        parts.append("lorelay trained it on its embedded copy of SmolLM2-135M-Instruct (dequantised from the Q4_1 "
                     "GGUF build); the adapter applies to the original checkpoint the way a QLoRA adapter applies "
                     "to its full-precision base.\n")
    elif not hub_id:
        parts.append(f"The base model was a local directory (`{base_name}`), so `base_model` is not set: load "
                     "that model yourself before applying this adapter.\n")
    if merged:
        parts.append(merge_sentence(manifest.get("merge"), base.get("quantization")))

    parts.append("## Training lineage\n")
    if run_info:
        name = run_info.get("name", "")
        pipeline = run_info.get("pipeline")
        parts.append(f"Run `{name}`" + (f" of pipeline `{pipeline}`" if pipeline else "")
                     + f"; this model is its policy stage `{policy}`.\n")
    parts.append(lineage_table(rows) + "\n")

    datasets = meta.get("datasets") or []
    local = local_datasets(manifest)
    if datasets or local:
        parts.append(f"## Data ({manifest.get('stage')} stage)\n")
        parts.extend(f"- [{d}](https://huggingface.co/datasets/{d})" for d in datasets
                     if f"hub:{d}" in (manifest.get("data") or {}).values())
        parts.extend(f"- `{name}` (local file, sha256 `{digest}…`)" for name, digest in local)
        parts.append("")

    parts.append("## Reproduce\n")
    checksums = ("the file checksums of the adapter stage it was merged from" if merged
                 else "the checksums of this repo's files")
    parts.append(f"`lorelay_config.yaml` is the resolved config of the `{manifest.get('stage')}` stage and "
                 f"`manifest.json` its training record: versions, data hashes, base fingerprint "
                 f"`{base.get('fingerprint', '?')}`, and {checksums}.\n")
    parts.append("```yaml\n" + config_yaml(manifest).rstrip() + "\n```\n")
    parts.append(_usage(repo, merged=merged, reward=is_reward_model(manifest)))

    versions = manifest.get("versions") or {}
    shown = ", ".join(f"{k} {versions[k]}" for k in ("lorelay", "torch", "transformers", "trl", "peft")
                      if k in versions)
    commit = manifest.get("git_commit")
    parts.append("## Versions\n")
    parts.append((shown or f"lorelay {__version__}") + (f"; lorelay commit `{commit[:12]}`" if commit else "") + ".\n")
    return "\n".join(parts)
