"""``lorelay merge``: a stage's adapter merged into full weights, saved as safetensors shards beside a model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipelines import model_card
from pipelines.stage_files import NOT_MERGED, human_size, merged_extras, resolve_target, run_manifests, stage_name
from stages.core.errors import LorelayError
from stages.core.training import verify_output

MAX_SHARD_SIZE = "5GB"     # merged safetensors shard size


def merge_command(target: str, *, out: str, base: str = "auto") -> int:
    """``lorelay merge STAGE_DIR --out DIR [--base dequantized|original]``."""
    stage_dir, run_info = resolve_target(target)
    out_dir = merge_stage(stage_dir, out, base=base, run_info=run_info)
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"lorelay: merged {stage_dir} into {out_dir} ({len(files)} files, {human_size(total)})")
    return 0


def merge_stage(stage_dir: str | Path, out: str | Path, *, base: str = "auto",
                max_shard_size: str | int | None = None, run_info: dict[str, Any] | None = None,
                write_card: bool = True) -> Path:
    """Merge a stage's adapter into full weights and save safetensors shards (``stages.core.merging``).

    ``base``: ``dequantized`` (the NF4 weights a QLoRA adapter trained on; the default for those),
    ``original`` (the full-precision checkpoint; the default for adapters trained unquantized).
    The output directory appears complete or not at all (built in ``<out>.partial``, then renamed).
    It holds the merged weights (``model*.safetensors``), config, tokenizer and chat template and a
    ``manifest.json`` whose ``merge`` section records the merge base and the largest logit difference
    from the adapter on the base as trained; with ``write_card``, a model card, ``lorelay_config.yaml``
    and ``metrics.json`` too.
    """
    from stages.core.merging import merged_model

    stage_dir, out = Path(stage_dir), Path(out)
    manifest = verify_output(stage_dir)
    if model_card.is_reward_model(manifest):
        raise LorelayError("a reward model is an adapter plus a score head, not a causal LM: it cannot be merged",
                           file=stage_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LorelayError("the output directory already exists and is not empty", file=out, field="--out",
                           hint="choose a new directory or remove this one")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    merged, _, fidelity = merged_model(stage_dir, manifest, base=base)
    merged.save_pretrained(partial, max_shard_size=max_shard_size or MAX_SHARD_SIZE)
    for name in sorted(manifest.get("files", {})):
        if name not in NOT_MERGED and not (partial / name).exists():
            target = partial / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(stage_dir / name, target)
    merged_manifest = {**manifest, "merge": fidelity}
    (partial / "manifest.json").write_text(json.dumps(merged_manifest, indent=2, default=str) + "\n")
    if write_card:
        card = model_card.render_card(merged_manifest, repo=str(out), stage_name=stage_name(stage_dir, run_info),
                                      run_info=run_info, merged=True, manifests=run_manifests(stage_dir, run_info))
        for extra in merged_extras(stage_dir, card, merged_manifest):
            (partial / extra.path_in_repo).write_bytes(extra.read())
    del merged
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out)
    return out


def planned_merged_files(stage_dir: Path, manifest: dict[str, Any]) -> list[tuple[str, int | None]]:
    """What a merge would write, without merging: weights estimated from the base's safetensors headers."""
    from stages.core.default_model import resolve_model_path
    from stages.core.merging import load_config_of

    config = load_config_of(manifest, "none")
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}[config.dtype]
    base_path = manifest.get("base_model", {}).get("path") or resolve_model_path(config.name)
    parameters = _safetensors_parameters(Path(base_path)) if Path(base_path).is_dir() else None
    rows: list[tuple[str, int | None]] = [
        ("model*.safetensors (+ index when sharded)", parameters * bytes_per if parameters else None),
        ("config.json", None), ("generation_config.json", None)]
    rows += [(name, (stage_dir / name).stat().st_size) for name in sorted(manifest.get("files", {}))
             if name not in NOT_MERGED]
    return rows


def _safetensors_parameters(folder: Path) -> int | None:
    """Parameter count from the JSON headers of a checkpoint's safetensors files (no tensors read)."""
    import struct

    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total or None
