"""What a cache key must cover besides the config: lorelay's code, the libraries, Hub commits.

- ``code_fingerprint(stage)``: lorelay's version and a hash of the source a stage runs: the shared
  blocks (``stages/core``), the stage's own recipe and any other module of the ``stages`` package
  except the other recipes. Editing ``stages/sft.py`` re-runs SFT (and, through the parent keys,
  what follows it) but not CPT; editing a block re-runs every stage.
- ``library_versions()``: torch, transformers, trl and peft, whose upgrades change what a stage
  computes.
- ``resolve_revision(repo_id, revision, kind)``: the commit SHA a Hub name points to now (a branch
  like ``main`` moves), asked of the Hub, or read from the local Hugging Face cache when offline. The
  runner resolves the base model and every Hub dataset once per run and records them in ``run.json``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

from stages import __version__

KEYED_LIBRARIES = ("torch", "transformers", "trl", "peft")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "stages"  # the source hashed into stage keys


def library_versions() -> dict[str, str]:
    versions = {}
    for name in KEYED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _source_hash(path: Path) -> str:
    stat = path.stat()
    return _hash_once(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _hash_once(path: Path, size: int, mtime_ns: int) -> str:  # an edited file has a new (size, mtime)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_fingerprint(stage) -> str:
    """lorelay's version + the sha256 of the source files ``stage`` runs (see the module docstring)."""
    from stages import registry

    def recipe_file(name: str) -> str:  # e.g. "sft.py" for stages.sft
        return Path(importlib.util.find_spec(registry.RECIPES[name]).origin).name

    other_recipes = {recipe_file(name) for name in registry.names()} - {recipe_file(stage.name)}
    digest = hashlib.sha256(__version__.encode())
    for file in sorted(PACKAGE_ROOT.rglob("*.py")):
        name = file.relative_to(PACKAGE_ROOT).as_posix()
        if name not in other_recipes:
            digest.update(f"{name}\0{_source_hash(file)}\n".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)  # once per run: a branch is resolved to one commit for all stages
def resolve_revision(repo_id: str, revision: str | None, kind: str = "model") -> str:
    """The commit SHA ``repo_id@revision`` names now: from the Hub, else from the local cache, else the name
    itself marked unresolved (a run that cannot reach the Hub and has nothing cached cannot load it either)."""
    if revision and COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().repo_info(repo_id, repo_type=kind, revision=revision).sha
        except Exception:  # noqa: BLE001 - unreachable or unknown: the cache may still know
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip()
    return f"unresolved:{repo_id}@{revision or 'main'}"


def hub_datasets(config: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(dataset id, revision) of every dataset spec in a resolved config that names a Hub dataset:
    a ``path`` that is no local file or directory and reads as ``owner/name[@revision]``."""
    found = []
    if isinstance(config, dict):
        path = config.get("path")
        if isinstance(path, str) and "split" in config and not Path(path).expanduser().exists():
            name, _, revision = path.partition("@")
            if HUB_NAME.match(name.removeprefix("hub:")):
                found.append((name.removeprefix("hub:"), revision or None))
        for value in config.values():
            found += hub_datasets(value)
    elif isinstance(config, list):
        for value in config:
            found += hub_datasets(value)
    return found


def model_key(path: str, revision: str | None) -> str:
    """A base model's fingerprint for cache keys, without loading it: its weights' hash when local, else
    ``id@commit`` for the commit its Hub revision names now."""
    from stages.core.modeling import fingerprint

    if Path(path).is_dir():
        return fingerprint(path, revision)
    return f"{path}@{resolve_revision(path, revision, 'model')}"


def base_revision(base) -> str:
    """``model_key`` of a loaded base (its weights were fingerprinted when it loaded)."""
    if Path(base.path).is_dir():
        return base.fingerprint
    return f"{base.path}@{resolve_revision(base.path, base.config.revision, 'model')}"
