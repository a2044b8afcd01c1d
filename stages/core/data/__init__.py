"""Training data in, internal records (or packed token blocks) out.

A ``DatasetSpec`` names a local file (JSONL, JSON, CSV/TSV, Parquet), a directory written by
``datasets``' ``save_to_disk``, or a Hugging Face Hub dataset id. ``load_records`` reads it row by
row, detects the format from the keys of the first record (or takes the declared one), converts each
row to one of the record forms in docs/architecture.md and checks it on the way. Every record keeps
``"source"``: ``"file:LINE"`` for files with lines, ``"file row N"`` (N from 0) for the others.

Faults in the data are ``DataError``s that name the file, the line and the field. A fault confined
to one row is a ``RowError``: ``skip_invalid=True`` skips such rows and counts them by reason
instead of stopping. Faults of the whole file (missing, empty, unreadable, unknown format) always stop.

The modules, in the order data flows through them:

- ``spec``: the names (formats, roles, fields), ``DatasetSpec``, ``Where`` and ``RowError``;
- ``readers``: files, saved datasets and Hub datasets -> raw rows with their place;
- ``fields`` and ``formats``: a raw row -> a checked record of its form;
- ``records``: one dataset -> ``LoadResult``; ``mixture``: datasets -> mixed train/eval, hashes;
- ``tokenize``: records -> token ids and loss masks;
- ``corpus`` and ``packing``: plain-text corpora -> documents -> packed blocks (CPT).

torch and transformers are not imported by importing this package, and ``datasets``/``pyarrow``
only inside the functions that need them, so ``lorelay data check`` starts fast.
"""

from stages.core.data.corpus import (TEXT_SUFFIXES, CorpusReport, CorpusSource, SourceReport, corpus_hash,
                                     cut_point, read_pieces, source_files)
from stages.core.data.fields import Row
from stages.core.data.formats import CONVERTERS, formats_for, settle_format
from stages.core.data.mixture import (Mixture, data_hash, file_sha256, load_mixture, mix, mix_counts, split,
                                      tree_sha256)
from stages.core.data.packing import (BlockCollator, PackedCorpus, blocks_in_batches, count_tokens, cut_block,
                                      encode, is_held_out, loss_tokens, pack, piece_positions, shuffle_buffer,
                                      take_tokens, to_device, tokenize_pieces)
from stages.core.data.readers import Rows, read_rows
from stages.core.data.records import LoadResult, load_records
from stages.core.data.spec import (DATA_SUFFIXES, FIELDS, FORM_OF_FORMAT, FORMATS, KIND_FORMATS, MAX_LINE_BYTES,
                                   PASSTHROUGH_KEYS, ROLES, SHAREGPT_ROLES, SIGNATURES, UTF8_BOM, DatasetSpec,
                                   Format, RowError, Where)
from stages.core.data.tokenize import (TokenizeReport, encode_record, encode_samples, text_completion_tokens,
                                       tokenize_records)

__all__ = [
    "BlockCollator", "CONVERTERS", "CorpusReport", "CorpusSource", "DATA_SUFFIXES", "DatasetSpec", "FIELDS",
    "FORMATS", "FORM_OF_FORMAT", "Format", "KIND_FORMATS", "LoadResult", "MAX_LINE_BYTES", "Mixture",
    "PASSTHROUGH_KEYS", "PackedCorpus", "ROLES", "Row", "RowError", "Rows", "SHAREGPT_ROLES", "SIGNATURES",
    "SourceReport", "TEXT_SUFFIXES", "TokenizeReport", "UTF8_BOM", "Where", "blocks_in_batches", "corpus_hash", "count_tokens",
    "cut_block", "cut_point", "data_hash", "encode", "encode_record", "encode_samples", "file_sha256", "formats_for",
    "is_held_out", "load_mixture", "load_records", "loss_tokens", "mix", "mix_counts", "pack",
    "piece_positions", "read_pieces", "read_rows", "settle_format", "shuffle_buffer", "source_files", "split",
    "take_tokens", "text_completion_tokens", "to_device", "tokenize_pieces", "tokenize_records", "tree_sha256",
]
