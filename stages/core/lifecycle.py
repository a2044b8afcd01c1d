"""One lifecycle for the shared base: every stage, the evaluator and the judge borrow it the same way.

A pipeline loads its base once and lends it to each stage in turn. A stage (or the trainer it runs)
changes the base in place in many ways: PEFT injects LoRA layers and ``modules_to_save`` wrappers into
its modules, the Trainer switches modules to train mode and may turn on activation checkpointing, TRL
hooks the input embeddings and patches ``forward``s, a CPT stage with ``new_tokens`` grows the
vocabulary. ``borrow`` takes a snapshot of all of it on entry and puts it back on exit, so whatever a
borrower did (and however it ended: an exception, an interruption), the next one finds the base
exactly as loaded::

    with borrow(base, adapter) as model:      # adapter: the directory the borrower will load, or None
        peft_model = attach_adapter(model, lora, init_from=adapter)
        ...

``adapter`` matters only for an adapter trained with new tokens (CPT ``new_tokens``): the base gets the
adapter's vocabulary (tokenizer and embedding rows) for the length of the borrow, so the adapter loads
wherever an adapter loads. Borrows nest: an inner borrow restores the state the outer one lent (for
example a policy adapter still attached while a reward adapter is put on and taken off).

What is restored, module by module: every attribute of the module's ``__dict__`` (so train/eval mode,
checkpointing flags, instance ``forward`` patches), and the contents of its containers in place
(``_modules`` undoes injected layers and wrappers, ``_parameters``/``_buffers`` undo resized or
re-tied weights, the hook dictionaries undo forward/backward hooks); each parameter's data and
``requires_grad``;
the model config's attributes (``vocab_size``, ``use_cache``); the ``Base`` record's fields (its
tokenizer among them) and the tokenizer's padding and truncation sides.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.errors import LorelayError
from stages.core.locks import released_on_error

TOKENIZER_SIDES = ("padding_side", "truncation_side")


class BaseSnapshot:
    """Everything a borrower may change on the shared base, captured so that it can be put back."""

    def __init__(self, base):
        self.base = base
        self.fields = dict(vars(base))
        model = base.model
        self.modules = [(module, _module_state(module)) for module in model.modules()]
        # ``.data`` too: resizing the embeddings swaps the data of the same Parameter object. The alias
        # costs no memory (it shares the storage the parameter holds now).
        self.parameters = [(param, param.data, param.requires_grad) for param in model.parameters()]
        self.configs = [(config, dict(vars(config))) for config in _configs(model)]
        self.tokenizer_sides = {name: getattr(base.tokenizer, name, None) for name in TOKENIZER_SIDES}

    def restore(self) -> None:
        for module, state in self.modules:
            _restore_module(module, state)
        for param, data, flag in self.parameters:
            if param.data.data_ptr() != data.data_ptr() or param.data.shape != data.shape:
                param.data = data
            param.requires_grad_(flag)
        for config, attributes in self.configs:
            for name in set(vars(config)) - set(attributes):
                delattr(config, name)
            vars(config).update(attributes)
        vars(self.base).update(self.fields)
        for name, value in self.tokenizer_sides.items():
            if value is not None:
                setattr(self.base.tokenizer, name, value)


def _module_state(module) -> dict[str, Any]:
    # Containers (``_modules``, ``_parameters``, hook dicts, ...) are copied shallowly and restored in
    # place: other objects (PEFT wrappers, torch itself) hold references to the very same dicts.
    return {name: (value, copy.copy(value) if isinstance(value, (dict, set)) else None)
            for name, value in vars(module).items()}


def _restore_module(module, state: dict[str, Any]) -> None:
    attributes = vars(module)
    for name in set(attributes) - set(state):
        del attributes[name]
    for name, (value, contents) in state.items():
        if contents is not None:
            value.clear()
            value.update(contents)
        attributes[name] = value


def _configs(model) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


@contextlib.contextmanager
def borrow(base, adapter: str | Path | None = None) -> Iterator[Any]:
    """Lend ``base.model`` to one borrower; on exit the base is exactly as it was on entry.

    With ``adapter`` (a saved adapter directory) the base first takes that adapter's vocabulary, when
    the adapter was trained with added tokens, so that ``attach_adapter(..., init_from=adapter)`` fits.
    """
    snapshot = BaseSnapshot(base)
    try:
        if adapter is not None:
            use_adapter_vocabulary(base, adapter)
        yield base.model
    finally:
        snapshot.restore()


def borrows_base(run):
    """Decorate a stage's ``run(config, base, adapter=None)``: the whole stage borrows ``base``, and when it
    fails, the output directory it locked is free again (``stages.core.locks.released_on_error``)."""

    @functools.wraps(run)
    def borrowing_run(config, base, adapter=None, **kwargs):
        with released_on_error(), borrow(base, adapter):
            return run(config, base, adapter, **kwargs)

    return borrowing_run


# ----------------------------------------------------------------------------------------------
# vocabulary: new tokens on the shared base, for the length of a borrow
# ----------------------------------------------------------------------------------------------

def extend_vocabulary(base, tokens: list[str]) -> dict:
    """Give the base ``tokens`` (in this order) and embedding rows for them; return what changed.

    ``base.tokenizer`` is replaced by an extended copy, never changed in place, so the borrow that
    surrounds this call can hand the original back. New rows are mean-initialised (transformers'
    ``mean_resizing``) from a fixed seed, so the same call on the same base gives the same rows; tied
    embeddings stay tied. Returns {} when nothing changed, else the record CPT keeps in manifest.json.
    """
    import torch

    if not tokens:
        return {}
    model = base.model
    vocab = base.tokenizer.get_vocab()
    new = [token for token in dict.fromkeys(tokens) if token not in vocab]
    rows_before = model.get_input_embeddings().weight.shape[0]
    size_before = len(base.tokenizer)
    if new:
        base.tokenizer = copy.deepcopy(base.tokenizer)
        base.tokenizer.add_tokens(new)
    tokenizer = base.tokenizer
    if len(tokenizer) > rows_before:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        for param in model.parameters():
            param.requires_grad_(False)
    return {"new_tokens": new, "already_present": [token for token in tokens if token in vocab],
            "token_ids": {token: tokenizer.convert_tokens_to_ids(token) for token in tokens},
            "tokenizer_size_before": size_before, "tokenizer_size": len(tokenizer),
            "embedding_rows_before": rows_before, "embedding_rows": model.get_input_embeddings().weight.shape[0]}


def adapter_tokens(adapter_dir: str | Path, tokenizer) -> list[str]:
    """Tokens the tokenizer saved with an adapter has beyond ``tokenizer``, in id order ([] for none)."""
    saved = Path(adapter_dir) / "tokenizer.json"
    if not saved.is_file():
        return []
    try:
        added = json.loads(saved.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError) as err:
        raise LorelayError(f"cannot read the adapter's tokenizer ({err})", file=saved) from None
    size = len(tokenizer)
    extra = sorted((entry["id"], entry["content"]) for entry in added if entry.get("id", -1) >= size)
    if extra and extra[0][0] != size:
        raise LorelayError(f"the adapter's tokenizer adds tokens from id {extra[0][0]}, but this base's tokenizer "
                           f"has {size}: it was trained on another base", file=saved)
    return [content for _, content in extra]


def use_adapter_vocabulary(base, adapter_dir: str | Path) -> dict:
    """Extend the base to the vocabulary ``adapter_dir`` was trained with (a no-op for most adapters)."""
    return extend_vocabulary(base, adapter_tokens(adapter_dir, base.tokenizer))
