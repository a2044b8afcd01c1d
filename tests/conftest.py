"""Shared fixtures: the SmolLM2 tokenizer and a tiny random Llama built from it at test time.

No test touches the network: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M checkpoint (converted once into the lorelay cache)."""
    from stages.core.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer, saved as safetensors (``TINY_LLAMA``)."""
    from stages.core.default_model import TINY_LLAMA, save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), **TINY_LLAMA)


def write_jsonl(path: Path, rows) -> Path:
    """Write rows (dicts, or raw strings written verbatim) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")
    return path


NEW_TOKENS = ["<|nimbus|>", "Zorblax"]


def copies_of(shape) -> set[int]:
    """Data pointers of the storages of every live tensor of this shape (a second copy of a base model would
    add one per weight). Tensors without real storage (the fake tensors torch.compile leaves in its caches)
    are not copies and are skipped."""
    import gc

    import torch

    pointers = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and tuple(obj.shape) == tuple(shape):
            try:
                pointers.add(obj.untyped_storage().data_ptr())
            except RuntimeError:  # FakeTensor / FunctionalTensor: no data
                continue
    return pointers


def base_state(base) -> dict:
    """Everything a stage could leave changed on a shared base, down to a digest of every weight."""
    import hashlib

    import torch

    model = base.model
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    embeddings = model.get_input_embeddings()
    return {
        "modules": [(name, type(module).__name__, module.training, len(module._forward_hooks),
                     len(module._forward_pre_hooks), "forward" in vars(module))
                    for name, module in model.named_modules()],
        "checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in model.modules()),
        "trainable": sorted(name for name, param in model.named_parameters() if param.requires_grad),
        "attributes": sorted(vars(model)),
        "vocabulary": (embeddings.weight.shape[0], model.config.vocab_size, len(base.tokenizer)),
        "tied": embeddings.weight is model.get_output_embeddings().weight,
        "weights": digest.hexdigest(),
    }


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's matmuls take microseconds; on a shared 2-core machine a second OpenMP thread turns
    each into milliseconds of waiting (see tests/stages/test_dpo.py). Use it with pytest.mark.usefixtures."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def new_tokens_cpt(tmp_path_factory, tiny_model_dir):
    """A CPT stage trained with two new tokens (embeddings and LM head in full), on a base that has
    activation checkpointing on, with that base's state before and after the stage."""
    from types import SimpleNamespace

    from stages import cpt
    from stages.core.config import load_config
    from stages.core.modeling import ModelConfig, load_base

    root = tmp_path_factory.mktemp("new-tokens")
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(4):
        (corpus / f"doc{index}.txt").write_text("The <|nimbus|> Zorblax robot cleans the pool. " * 4)
    base = load_base(ModelConfig(name=str(tiny_model_dir), activation_checkpointing=True))
    config = load_config(cpt.CPTConfig, None, [
        f"data.sources=[{{path: {corpus}}}]", "data.eval_ratio=0", "data.block_size=32",
        f"new_tokens=[{', '.join(NEW_TOKENS)}]", "lora.modules_to_save=[embed_tokens, lm_head]",
        "lora.r=4", "lora.alpha=8", f"training.output_dir={root / 'cpt'}", "training.max_steps=2",
        "training.batch_size=4", "training.learning_rate=3e-2", "training.logging_steps=1",
        f"model.name={tiny_model_dir}"])
    before = base_state(base)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread does, for this session-wide fixture
    try:
        output = cpt.run(config, base)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(base=base, output=output, before=before, after=base_state(base), root=root)


def save_perturbed(model, path: Path, seed: int) -> Path:
    """Give a freshly attached adapter nonzero LoRA B weights (a trained-looking adapter: unlike a fresh one it
    changes the model), save it to ``path`` and detach it from the base."""
    import torch

    from stages.core.modeling import detach_adapter

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    detach_adapter(model)
    return path


def chats(n: int) -> list[dict]:
    """n one-turn triage chats alternating between two queues."""
    labels = ["billing", "shipping"]
    return [{"messages": [{"role": "user", "content": f"Route this ticket: case {i} about {labels[i % 2]}"},
                          {"role": "assistant", "content": labels[i % 2]}]} for i in range(n)]


def pairs(n: int) -> list[dict]:
    """n preference pairs: the chosen reply is signed off."""
    return [{"prompt": f"Question {i}?", "chosen": f"Answer {i}. — Support", "rejected": f"Answer {i}."}
            for i in range(n)]
