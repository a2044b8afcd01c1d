"""Mixing and splitting datasets, and the hashes that identify them in manifests."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.core.data.hash_memo import memoised_sha256
from stages.core.data.records import LoadResult, load_records
from stages.core.data.spec import DatasetSpec
from stages.core.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------------
# Mixing and splitting
# ----------------------------------------------------------------------------------------------

def mix_counts(sizes: Sequence[tuple[DatasetSpec, int]]) -> list[int]:
    """How many records each dataset gives the mix.

    ``samples`` is an exact count. The other datasets share the sum of their sizes: whole, when none
    sets ``weight``; in proportion to the weights (largest-remainder rounding), when all do.
    """
    free = [index for index, (spec, _) in enumerate(sizes) if spec.samples is None]
    weighted = [index for index in free if sizes[index][0].weight is not None]
    if weighted and len(weighted) != len(free):
        unweighted = next(sizes[index][0].path for index in free if index not in weighted)
        raise ConfigError(f"'{unweighted}' has no weight while other datasets have one: weights are "
                          "shares of the mix, so set one on every dataset without `samples`, or on none",
                          field="weight")
    counts = [spec.samples if spec.samples is not None else size for spec, size in sizes]
    if weighted:
        total = sum(sizes[index][1] for index in free)
        shares = _apportion(total, [sizes[index][0].weight for index in free])
        for index, share in zip(free, shares):
            counts[index] = share
    return counts


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` into whole numbers that add up to ``total``."""
    exact = [total * weight / sum(weights) for weight in weights]
    counts = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda index: (counts[index] - exact[index], index))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def _draw(records: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` records: a draw without replacement, or whole copies plus a drawn remainder."""
    if count and not records:
        raise DataError("no records to draw from")
    repeats, remainder = divmod(count, len(records)) if records else (0, 0)
    return records * repeats + rng.sample(records, remainder)


def mix(results: Sequence[tuple[DatasetSpec, list[dict]]], seed: int) -> list[dict]:
    """One shuffled list drawn from each dataset by ``mix_counts``; the same seed, the same mix.

    Repeated records are the same dict objects: treat records as read-only.
    """
    counts = mix_counts([(spec, len(records)) for spec, records in results])
    mixed: list[dict] = []
    for index, ((_spec, records), count) in enumerate(zip(results, counts)):
        mixed.extend(_draw(records, count, random.Random(f"{seed}:{index}")))
    random.Random(seed).shuffle(mixed)
    return mixed


def split(records: Sequence[dict], eval_ratio: float, seed: int, *,
          name: str | None = None) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint (train, eval) split; each part keeps the records' original order.

    ``name`` (the dataset's path) is only for the error when there are too few records.
    """
    if not 0 <= eval_ratio < 1:
        raise ConfigError(f"must be at least 0 and below 1, got {eval_ratio!r}", field="eval_ratio")
    if eval_ratio == 0:
        return list(records), []
    held_out = max(1, round(len(records) * eval_ratio))
    if held_out >= len(records):
        raise DataError(f"only {len(records)} records: too few to hold out eval_ratio={eval_ratio} and "
                        "still train", file=name, hint="lower eval_ratio, or give eval datasets")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held_out])
    train = [record for index, record in enumerate(records) if index not in chosen]
    evaluation = [records[index] for index in sorted(chosen)]
    return train, evaluation


@dataclass
class Mixture:
    """Train and eval records of a stage, with what went in (for logs and manifest.json)."""

    train: list[dict]
    eval: list[dict]
    form: str  # "chat", "text", "preference" or "kto": the record form of every record
    # One entry per dataset: path, role (train/eval), format, records, used, held_out, skipped,
    # duplicates.
    report: list[dict]
    data_hashes: dict[str, str]  # path -> sha256 of the file (or of a directory's files), or "hub:<id>"


def load_mixture(specs: Sequence[DatasetSpec], kind: str, seed: int, eval_ratio: float = 0.0,
                 eval_specs: Sequence[DatasetSpec] | None = None, skip_invalid: bool = False) -> Mixture:
    """Load every dataset, hold out eval records, and mix the rest.

    With ``eval_ratio``, each dataset holds out its own share before mixing, so an upsampled record
    never lands in both train and eval; ``weight``/``samples`` then apply to the train part. Given
    ``eval_specs``, those datasets (mixed by their own weights) are the eval set and ``eval_ratio`` is
    not used: stage configs keep a default ratio for when no eval datasets are listed.
    """
    if not specs:
        raise ConfigError("no datasets given: list at least one", field="datasets")
    if eval_specs:
        eval_ratio = 0.0
    loaded = [load_records(spec, kind=kind, skip_invalid=skip_invalid) for spec in specs]
    parts = [split(result.records, eval_ratio, seed + index, name=result.path)
             for index, result in enumerate(loaded)]
    train_parts = [(spec, train) for spec, (train, _) in zip(specs, parts)]
    report = _report("train", loaded, mix_counts([(spec, len(train)) for spec, train in train_parts]),
                     [len(held) for _, held in parts])
    train = mix(train_parts, seed)
    evaluation = [record for _, held in parts for record in held]
    eval_loaded: list[LoadResult] = []
    if eval_specs:
        eval_loaded = [load_records(spec, kind=kind, skip_invalid=skip_invalid) for spec in eval_specs]
        eval_sets = [(spec, result.records) for spec, result in zip(eval_specs, eval_loaded)]
        evaluation = mix(eval_sets, seed)
        report += _report("eval", eval_loaded, mix_counts([(s, len(r)) for s, r in eval_sets]),
                          [0] * len(eval_loaded))
    form = _common_form(loaded + eval_loaded)
    hashes = {spec.path: data_hash(spec.path) for spec in [*specs, *(eval_specs or [])]}
    return Mixture(train=train, eval=evaluation, form=form, report=report, data_hashes=hashes)


def _report(role: str, loaded: Sequence[LoadResult], used: Sequence[int],
            held_out: Sequence[int]) -> list[dict]:
    return [{"path": result.path, "role": role, "format": result.format, "records": len(result.records),
             "used": count, "held_out": held, "skipped": dict(result.skipped),
             "duplicates": result.duplicates}
            for result, count, held in zip(loaded, used, held_out)]


def _common_form(loaded: Sequence[LoadResult]) -> str:
    """Every dataset of one stage must give the same record form (an SFT run is chat or text)."""
    forms = {result.form: result.path for result in loaded}
    if len(forms) > 1:
        listed = ", ".join(f"{path} ({form})" for form, path in forms.items())
        raise ConfigError(f"cannot mix record forms in one run: {listed}", field="datasets",
                          hint="use only chat datasets or only plain-text datasets")
    return next(iter(forms))


# ----------------------------------------------------------------------------------------------
# Hashes for manifests
# ----------------------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks; remembered across runs while the file is unchanged
    (``stages.core.data.hash_memo``)."""
    return memoised_sha256(path, read_sha256)


def read_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in full in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(directory: str | Path) -> str:
    """One sha256 for a directory: every file's relative path and sha256, in sorted order."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(directory).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def data_hash(path: str) -> str:
    """What identifies a dataset's contents in a manifest: a file or tree sha256, or the Hub id."""
    local = Path(path).expanduser()
    if local.is_file():
        return file_sha256(local)
    if local.is_dir():
        return tree_sha256(local)
    return f"hub:{path}"
