"""Every use of a private name of TRL, transformers or PEFT, in one place, each checked by
``tests/stages/core/test_compat.py`` so that a library upgrade that removes one fails with a clear message.
"""

from __future__ import annotations


def attention_implementation(model) -> str:
    """The attention kernel a loaded model runs (transformers keeps it in ``config._attn_implementation``)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


def log_trainer_metrics(trainer, mode: str, values: dict[str, float]) -> None:
    """Append to the per-step metrics TRL's trainers average and log (``trainer._metrics[mode]``)."""
    metrics = trainer._metrics[mode]
    for key, value in values.items():
        metrics[key].append(value)


def count_train_tokens(trainer, tokens: int) -> None:
    """Add to TRL's running ``num_tokens`` count (``trainer._total_train_tokens``) and log it."""
    trainer._total_train_tokens += tokens
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]

