"""Loading a model's tokenizer, for training or on its own.

Training loads it with ``AutoTokenizer``, which reads the model's config to choose the tokenizer class;
in transformers 5 importing ``AutoTokenizer`` imports torch and the model stack (2-3 s on a CPU, longer
than ``lorelay data check`` takes to read 100k rows). A command that only tokenizes (``alone=True``)
loads a local model directory's tokenizer as the generic fast class (``TokenizersBackend``) without
AutoTokenizer when the files show that AutoTokenizer would choose that class too: a ``tokenizer.json``,
a ``tokenizer_config.json`` that declares the generic class and no remote code, a ``config.json``
whose model type AutoTokenizer does not override (``compat.AUTO_TOKENIZER_OVERRIDDEN_TYPES``), and
no Mistral ``tekken.json``. Every other tokenizer, and every Hub id, goes through AutoTokenizer, so
both ways tokenize exactly as training does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.core import compat
from stages.core.errors import LorelayError, first_line

# What tokenizer_config.json names the generic fast tokenizer (transformers 5 keeps the old name as an alias).
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str, config, *, alone: bool = False) -> tuple[Any, str]:
    """``(tokenizer, chat template source)`` for ``config`` (a ``ModelConfig``) from ``path``.

    ``alone``: the caller never loads the model, so skip AutoTokenizer (and torch) where the
    files allow (see the module doc). The tokenizer gets a pad token (EOS) when it has none, and the
    chat template from ``stages.core.chat.ensure_chat_template``.
    """
    from stages.core.chat import ensure_chat_template

    try:
        if alone and loads_as_generic(Path(path), config):
            from transformers import TokenizersBackend

            tokenizer = TokenizersBackend.from_pretrained(path)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, revision=config.revision,
                                                      trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:  # ValueError: a directory whose files name no tokenizer AutoTokenizer knows
        local = Path(path).is_dir()
        raise LorelayError(f"cannot load a tokenizer from {'this directory' if local else 'the Hub'}: "
                           f"{first_line(err)}", file=path, field="model.name",
                           hint=None if local else "there is no local directory of that name either") from None
    if tokenizer.pad_token is None:
        # Padding is only used for generation batches; EOS as pad is the common safe choice.
        tokenizer.pad_token = tokenizer.eos_token
    source = ensure_chat_template(tokenizer, config.chat_template)
    return tokenizer, source


def loads_as_generic(directory: Path, config) -> bool:
    """Whether AutoTokenizer would load ``directory``'s tokenizer as ``TokenizersBackend``, judged from
    its files alone. False whenever in doubt: the caller then asks AutoTokenizer."""
    if config.trust_remote_code or not (directory / "tokenizer.json").is_file() or (directory / "tekken.json").exists():
        return False
    declared, model = _json_object(directory / "tokenizer_config.json"), _json_object(directory / "config.json")
    if declared is None or model is None or "auto_map" in declared or "auto_map" in model:
        return False
    return (declared.get("tokenizer_class") in GENERIC_CLASSES
            and model.get("model_type") not in compat.AUTO_TOKENIZER_OVERRIDDEN_TYPES)


def _json_object(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # AutoTokenizer will say what is wrong with it
    return value if isinstance(value, dict) else None
