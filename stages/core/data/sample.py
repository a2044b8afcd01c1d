"""A quick read of the first rows of a stage's data, as the stage will read them.

``lorelay run`` samples every stage's datasets before the base model loads, so a missing file, an
unknown format or a malformed first row is found in seconds, not after the earlier stages trained.
A path that an earlier stage of the pipeline writes (``skip``) is not there yet and is not read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import islice

from stages.core.data.corpus import CorpusSource, read_pieces
from stages.core.data.records import load_records
from stages.core.data.spec import DatasetSpec

SAMPLE_ROWS = 64


def _never(path: str) -> bool:
    return False


def sample_stage_data(data, kind: str, *, skip: Callable[[str], bool] = _never) -> None:
    """A stage's ``data.datasets`` (at least one) and ``data.eval_datasets``, sampled as ``sample_records`` does."""
    from stages.core.errors import ConfigError

    if not data.datasets:
        raise ConfigError("no datasets given: list at least one", field="data.datasets")
    sample_records([*data.datasets, *data.eval_datasets], kind, skip_invalid=data.skip_invalid, skip=skip)


def sample_records(specs: Sequence[DatasetSpec], kind: str, *, skip_invalid: bool = False,
                   skip: Callable[[str], bool] = _never) -> None:
    """Read and check the first rows of each dataset as ``load_records`` would for ``kind``."""
    for spec in specs:
        if not skip(spec.path):
            load_records(spec, kind=kind, skip_invalid=skip_invalid, limit=SAMPLE_ROWS)


def sample_corpus(sources: Sequence[CorpusSource], *, skip: Callable[[str], bool] = _never) -> None:
    """Read the first document of each corpus (its files are listed, the first one decoded)."""
    for source in sources:
        if not skip(source.path):
            list(islice(read_pieces([source]), 1))
