"""Continued pretraining: packing keeps documents apart, streaming stays flat, bad corpora are named,
perplexity falls, new tokens grow the embeddings and round-trip."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest
import torch

import stages.core.data.corpus as corpus_module
from stages.core.config import load_config
from stages.core.data import (BlockCollator, CorpusSource, PackedCorpus, is_held_out, pack, piece_positions,
                              read_pieces, tokenize_pieces)
from stages.core.lifecycle import borrow, extend_vocabulary
from stages.cpt import CPTConfig, run
from stages.core.errors import ConfigError, DataError
from stages.core.modeling import LoraSettings, ModelConfig, attach_adapter, detach_adapter, load_base
from stages.core.training import TrainingConfig, decay_steps, trainer_args, verify_output
from tests.conftest import write_jsonl

DOCS = ["The pool robot cleans the floor.", "Refunds take five days.", "Reset: hold the stop button for 15 seconds."]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(ModelConfig(name=str(tiny_model_dir)))


def write_docs(directory, docs):
    directory.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(docs):
        (directory / f"doc{index}.txt").write_text(text + "\n", encoding="utf-8")
    return directory


def cpt_config(tmp_path, *overrides) -> CPTConfig:
    return load_config(CPTConfig, None, [
        f"training.output_dir={tmp_path / 'cpt'}", "training.batch_size=4", "training.learning_rate=3e-2",
        "training.logging_steps=1", "training.warmup_ratio=0.1", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0",
        "data.block_size=32", *overrides])


# ---- packing --------------------------------------------------------------------------------------

def test_packing_keeps_document_boundaries_and_eos(tmp_path, tokenizer):
    corpus = write_docs(tmp_path / "corpus", DOCS)
    blocks = list(PackedCorpus([CorpusSource(str(corpus))], tokenizer, block_size=12))
    eos = tokenizer.eos_token_id
    docs = [tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos] for doc in DOCS]
    assert [i for b in blocks for i in b["input_ids"]] == [i for d in docs for i in d]  # nothing lost, EOS after each
    assert all(len(b["input_ids"]) == 12 for b in blocks[:-1])
    # seq_lengths are the documents, cut where a block ends (the rest continues the next block)
    pieces, filled = [], 0
    for doc in docs:
        left = len(doc)
        while left:
            take = min(left, 12 - filled % 12)
            pieces.append(take)
            left, filled = left - take, filled + take
    assert [n for b in blocks for n in b["seq_lengths"]] == pieces and len(pieces) > len(docs)
    assert all(sum(b["seq_lengths"]) == len(b["input_ids"]) for b in blocks)


def test_separator_splits_one_file_into_documents_and_blank_ones_are_skipped(tmp_path, tokenizer):
    path = tmp_path / "many.txt"
    path.write_text("\n===\n".join([DOCS[0], "   ", DOCS[1] + "\n\n", DOCS[2]]), encoding="utf-8")
    report = corpus_module.CorpusReport()
    pieces = list(read_pieces([CorpusSource(str(path), separator="\n===\n")], report=report))
    assert pieces == [(DOCS[0], True), (DOCS[1], True), (DOCS[2], True)]
    assert report.sources[0].documents == 3 and report.sources[0].empty_documents == 1


def test_a_long_document_is_tokenized_in_pieces_exactly_as_whole(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_module, "READ_BYTES", 1000)
    monkeypatch.setattr(corpus_module, "PIECE_CHARS", 300)
    text = "".join(f"Line {i}: the Nimbus robot charges in {i % 7} hours.\n    indented detail {i}\n\n"
                   for i in range(200)).strip()
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    pieces = list(read_pieces([CorpusSource(str(tmp_path / "long.txt"))]))
    assert len(pieces) > 10 and "".join(p for p, _ in pieces) == text
    ids = [i for tokens, _ in tokenize_pieces(pieces, tokenizer, 0) for i in tokens]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [0]


def test_position_ids_restart_per_document_and_first_tokens_carry_no_loss():
    blocks = list(pack([([11, 12, 13], True), ([21, 22], True), ([31, 32, 33, 34], True)], block_size=6))
    assert blocks == [{"input_ids": [11, 12, 13, 21, 22, 31], "seq_lengths": [3, 2, 1]},
                      {"input_ids": [32, 33, 34], "seq_lengths": [3]}]
    assert piece_positions([3, 2, 1]) == [0, 1, 2, 0, 1, 0]
    batch = BlockCollator(pad_token_id=0)(blocks)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100], [-100, 33, 34, -100, -100, -100]]
    assert batch["input_ids"][1].tolist() == [32, 33, 34, 0, 0, 0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_block_logits_equal_the_documents_run_separately(base, attention):
    """Rows without an attention mask (sdpa/eager) and the flattened padding-free row (flash's layout)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer, model = base.tokenizer, base.model.eval()
    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in DOCS]
    block = {"input_ids": [i for d in docs for i in d], "seq_lengths": [len(d) for d in docs]}
    short = {"input_ids": docs[1], "seq_lengths": [len(docs[1])]}
    rows = BlockCollator(tokenizer.pad_token_id)([block, short])
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([block, short])
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention)
    try:
        with torch.no_grad():
            alone = [model(input_ids=torch.tensor([d])).logits[0] for d in docs]
            packed_rows = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"]).logits
            packed_flat = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
    finally:
        model.set_attn_implementation(previous)
    start = 0
    for doc, logits in zip(docs, alone):
        torch.testing.assert_close(packed_rows[0, start:start + len(doc)], logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed_flat[start:start + len(doc)], logits, atol=1e-5, rtol=1e-4)
        start += len(doc)
    torch.testing.assert_close(packed_rows[1, :len(docs[1])], alone[1], atol=1e-5, rtol=1e-4)


# ---- streaming --------------------------------------------------------------------------------------

class WordTokenizer:
    """A stand-in tokenizer (one id per word) so a many-MB file streams through in seconds."""

    eos_token_id = 0

    def __call__(self, text, **kwargs):
        return {"input_ids": [len(word) for word in text.split()]}


def test_streaming_a_file_larger_than_the_buffer_keeps_memory_flat(tmp_path, tokenizer):
    path = tmp_path / "big.txt"
    line = "the nimbus pool robot scrubs the floor and the walls every single morning\n"
    with open(path, "w", encoding="utf-8") as handle:
        for doc in range(1500):
            handle.write(line * 80 + "\n\n\n")
    size = path.stat().st_size
    assert size > 8 << 20
    source = CorpusSource(str(path), separator="\n\n\n")

    stream = PackedCorpus([source], WordTokenizer(), block_size=64, shuffle=16, seed=3)
    tracemalloc.start()
    tokens = sum(len(block["input_ids"]) for block in stream)  # the whole file, through a 16-block buffer
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert tokens == 1500 * (80 * 13 + 1)
    assert stream.report.documents == 1500
    assert peak < 2 << 20, f"peak {peak / 2**20:.1f} MiB while streaming a {size / 2**20:.0f} MiB file"

    # The real tokenizer with a token budget reads only the start of the file.
    budget = PackedCorpus([source], tokenizer, block_size=64, shuffle=8, max_tokens=1000)
    tracemalloc.start()
    blocks = list(budget)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(len(b["input_ids"]) for b in blocks) == 1000 and budget.report.budget_reached
    assert peak < 2 << 20


def test_shuffle_buffer_reorders_blocks_and_hold_out_keeps_them_apart(tmp_path):
    corpus = write_docs(tmp_path / "corpus", [f"document {i} " + "word " * (i % 9) for i in range(60)])
    plain = [tuple(b["input_ids"]) for b in PackedCorpus([CorpusSource(str(corpus))], WordTokenizer(), block_size=8)]
    stream = PackedCorpus([CorpusSource(str(corpus))], WordTokenizer(), block_size=8, shuffle=4, seed=1)
    shuffled = [tuple(b["input_ids"]) for b in stream]
    assert shuffled != plain and sorted(shuffled) == sorted(plain)

    held = stream.hold_out(0.2, max_tokens=10_000)
    train = [tuple(b["input_ids"]) for b in stream]
    assert held and len(held) + len(train) == len(plain)
    assert stream.held_out == {i for i in range(len(plain)) if is_held_out(i, 0.2, 1)}


def test_text_column_sources_and_a_missing_column(tmp_path, tokenizer):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": DOCS[0]}, {"text": "  "}, {"text": DOCS[1]}])
    pieces = list(read_pieces([CorpusSource(str(rows))]))
    assert pieces == [(DOCS[0], True), (DOCS[1], True)]
    from datasets import Dataset

    Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "saved"))
    assert len(list(read_pieces([CorpusSource(str(tmp_path / "saved"), text_column="body")]))) == 3
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"txt": DOCS[0]}])
    with pytest.raises(DataError, match=r"wrong.jsonl:1.*no 'text' column.*did you mean 'txt'"):
        list(read_pieces([CorpusSource(str(wrong))]))


# ---- bad corpora -------------------------------------------------------------------------------------

def _bad_source(tmp_path, kind):
    if kind == "binary":
        (tmp_path / "archive.txt").write_bytes(b"PK\x03\x04" + bytes(range(256)))
        return "archive.txt", r"archive.txt:1: looks like a binary file.*NUL byte at byte offset 4"
    if kind == "not utf-8":
        (tmp_path / "latin1.txt").write_bytes("hello\nworld caf\xe9 au lait\n".encode("latin-1"))
        return "latin1.txt", r"latin1.txt:2: not valid UTF-8.*0xe9 at byte offset 15"
    if kind == "empty":
        (tmp_path / "empty.txt").write_text(" \n\n")
        return "empty.txt", r"empty.txt: no text"
    if kind == "empty directory":
        (tmp_path / "nothing").mkdir()
        (tmp_path / "nothing" / "image.png").write_bytes(b"\x89PNG")
        return "nothing", r"nothing: no text files"
    if kind == "missing":
        (tmp_path / "corpus.txt").write_text("x")
        return "corpsu.txt", r"corpsu.txt: file not found \(did you mean '.*corpus.txt'\?\)"
    os.mkfifo(tmp_path / "pipe")
    return "pipe", r"pipe: is not a regular file or directory"


@pytest.mark.parametrize("kind", ["binary", "not utf-8", "empty", "empty directory", "missing", "not a file"])
def test_bad_corpora_are_named(tmp_path, tokenizer, kind):
    name, message = _bad_source(tmp_path, kind)
    with pytest.raises(DataError, match=message):
        list(PackedCorpus([CorpusSource(str(tmp_path / name))], tokenizer, block_size=16))


def test_invalid_utf8_across_read_chunks_is_placed_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "READ_BYTES", 7)  # multi-byte characters straddle the reads
    data = "line öne\nline twö\nthree ééé\n".encode("utf-8") + b"\xff tail\n"
    (tmp_path / "bad.txt").write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(DataError, match=rf"bad.txt:4: not valid UTF-8.*0xff at byte offset {offset}"):
        list(read_pieces([CorpusSource(str(tmp_path / "bad.txt"))]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    with pytest.raises(DataError, match="secret.txt: cannot read the file: Permission denied"):
        list(read_pieces([CorpusSource(str(path))]))


def test_a_bad_corpus_leaves_no_output(tmp_path, base):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="binary"):
        run(cpt_config(tmp_path, f"data.sources=[{{path: {tmp_path / 'bin.txt'}}}]"), base)
    assert not (tmp_path / "cpt").exists()


def test_streaming_needs_a_budget():
    with pytest.raises(ConfigError, match="data.max_tokens"):
        load_config(CPTConfig, None, ["data.sources=[{path: x.txt}]", "data.streaming=true"])


# ---- training ----------------------------------------------------------------------------------------

def test_cpt_lowers_perplexity_with_a_decaying_schedule(tmp_path, base):
    corpus = write_docs(tmp_path / "corpus", ["The Nimbus robot cleans the pool every morning. " * 6] * 6)
    probe = torch.tensor([base.tokenizer("The Nimbus robot")["input_ids"]])
    with torch.no_grad():
        plain = base.model(input_ids=probe).logits
    config = cpt_config(tmp_path, f"data.sources=[{{path: {corpus}}}]", "data.eval_ratio=0.2",
                        "training.max_steps=8", "training.lr_scheduler=warmup_stable_decay",
                        "training.decay_ratio=0.25")
    output = run(config, base)

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "metrics.json",
                 "manifest.json"):
        assert (output / name).exists(), name
    assert not output.with_name("cpt.partial").exists()
    manifest = verify_output(output)
    assert manifest["stage"] == "cpt" and str(corpus) in manifest["data"]
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["perplexity_after"] < 0.5 * metrics["perplexity_before"], metrics
    assert metrics["steps"] == 8 and 0 < metrics["train_tokens"] <= 8 * 4 * 32
    assert metrics["data"]["train"]["held_out_blocks"] >= 1 and metrics["eval_tokens"] > 0
    rates = [entry["learning_rate"] for entry in metrics["log_history"] if "learning_rate" in entry]
    # warmup from the floor, a stable plateau at the peak, a decay over the last quarter of the steps
    assert rates[0] < 3e-2 and rates[1:6] == pytest.approx([3e-2] * 5) and rates[-1] < 0.6 * 3e-2, rates
    with torch.no_grad():
        torch.testing.assert_close(base.model(input_ids=probe).logits, plain)  # the shared base is bare again


def test_streaming_run_trains_on_the_token_budget(tmp_path, base):
    corpus = write_docs(tmp_path / "corpus", [f"Ticket {i}: the parcel never arrived, queue shipping." for i in range(40)])
    (tmp_path / "eval.txt").write_text("Ticket 99: the parcel never arrived, queue shipping.\n")
    config = cpt_config(tmp_path, f"data.sources=[{{path: {corpus}}}]", f"data.eval_sources=[{{path: {tmp_path / 'eval.txt'}}}]",
                        "data.streaming=true", "data.max_tokens=256", "data.shuffle_buffer=4", "training.batch_size=2")
    output = run(config, base)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["train_tokens"] == 256  # 256 tokens / (2 blocks x 32 tokens)
    assert metrics["perplexity_after"] < metrics["perplexity_before"]


def test_schedules_for_cpt_warm_up_and_decay_to_the_floor(tmp_path, base):
    from transformers import get_scheduler
    from trl import SFTConfig as TRLSFTConfig

    for name in ("warmup_stable_decay", "cosine_with_min_lr"):
        training = TrainingConfig(lr_scheduler=name, learning_rate=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1,
                                  decay_ratio=0.25)
        args = trainer_args(TRLSFTConfig, training, base, tmp_path, has_eval=False, max_steps=20)
        if name == "warmup_stable_decay":  # what fit() adds once the step count is known
            args.lr_scheduler_kwargs = {**args.lr_scheduler_kwargs, "num_decay_steps": decay_steps(training, 20)}
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(20),
                                  num_training_steps=20, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        rates = []
        for _ in range(20):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        assert rates[0] < rates[2] == pytest.approx(1e-3), (name, rates)
        assert rates[-1] < 0.2e-3 and rates[-1] >= 0.1e-3 - 1e-12, (name, rates)
        if name == "warmup_stable_decay":
            assert rates[2:15] == pytest.approx([1e-3] * 13)  # stable until the last quarter


# ---- new tokens -----------------------------------------------------------------------------------------

def test_new_tokens_need_trained_embeddings(tmp_path, tiny_model_dir):
    fresh = load_base(ModelConfig(name=str(tiny_model_dir)))
    size = len(fresh.tokenizer)
    (tmp_path / "c.txt").write_text("text")
    config = cpt_config(tmp_path, f"data.sources=[{{path: {tmp_path / 'c.txt'}}}]", "new_tokens=[<|nimbus|>]",
                        "lora.modules_to_save=[embed_tokens]")
    with pytest.raises(ConfigError, match=r"lora.modules_to_save.*embed_tokens, lm_head"):
        run(config, fresh)
    assert len(fresh.tokenizer) == size and not (tmp_path / "cpt").exists()


def test_new_tokens_resize_embeddings_save_the_tokenizer_and_round_trip(tmp_path, tiny_model_dir):
    fresh = load_base(ModelConfig(name=str(tiny_model_dir)))
    rows = fresh.model.get_input_embeddings().weight.shape[0]
    original = fresh.model.get_input_embeddings().weight.detach().clone()
    corpus = write_docs(tmp_path / "corpus", ["The <|nimbus|> Zorblax robot cleans the pool. " * 4] * 4)
    tokens = ["<|nimbus|>", "Zorblax"]
    config = cpt_config(tmp_path, f"data.sources=[{{path: {corpus}}}]", "data.eval_ratio=0",
                        f"new_tokens=[{', '.join(tokens)}]", "lora.modules_to_save=[embed_tokens, lm_head]",
                        "training.max_steps=2")
    output = run(config, fresh)

    # The shared base is lent for the stage only: afterwards its vocabulary is the original one again.
    embeddings = fresh.model.get_input_embeddings().weight
    assert embeddings.shape[0] == rows and embeddings is fresh.model.get_output_embeddings().weight
    assert torch.equal(embeddings, original) and len(fresh.tokenizer) == rows
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(output)
    assert [saved.convert_tokens_to_ids(t) for t in tokens] == [rows, rows + 1]
    assert saved("The <|nimbus|>", add_special_tokens=False)["input_ids"][-1] == rows
    weights = load_file(output / "adapter_model.safetensors")
    full = {name: tensor.shape for name, tensor in weights.items() if "lora_" not in name}
    assert len(full) == 2 and all(shape[0] == rows + 2 for shape in full.values()), full
    manifest = verify_output(output)
    assert manifest["vocabulary"]["new_tokens"] == tokens

    # The adapter brings its vocabulary wherever it is borrowed with; the base's own new rows do not count.
    probe = torch.tensor([saved("The <|nimbus|> Zorblax robot")["input_ids"]])
    with borrow(fresh, output) as lent:
        assert len(fresh.tokenizer) == rows + 2
        model = attach_adapter(lent, LoraSettings(), init_from=output)
        with torch.no_grad():
            expected = model(input_ids=probe).logits
    other = load_base(ModelConfig(name=str(tiny_model_dir)))
    assert extend_vocabulary(other, tokens)["embedding_rows"] == rows + 2
    with torch.no_grad():
        other.model.get_input_embeddings().weight[rows:] = 0
    model = attach_adapter(other.model, LoraSettings(), init_from=output)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, expected)
    detach_adapter(model)
