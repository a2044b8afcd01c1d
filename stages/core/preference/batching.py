"""Which batching a preference trainer gets: lorelay's packed rows or TRL's padded batches, and why.

Each method's step module (``dpo_step``, ``orpo_step``, ``kto_step``, ``reward_step``) lists what rules the packed
path out for a run (a loss it has no packed form of, a model it cannot read log-probs or scores from); the
attention kernel then decides whether a row carries a block mask (sdpa, eager: replies can share their prompt)
or only restarting position ids (flash-attention: one segment per sequence). ``report_batching`` prints the
choice once and refuses where ``padding_free: true`` ruled padding out.
"""

from __future__ import annotations

import dataclasses

from stages.core.preference.collate import MASKED_ATTENTION

# Kernels that separate packed sequences by their restarting position ids but take no block mask.
POSITION_ID_ATTENTION = ("flash_attention_2", "flash_attention_3")

PADDED = "padded (TRL)"
SHARED = "packed, prompt shared"
REPEATED = "packed, prompt repeated"


@dataclasses.dataclass(frozen=True)
class Batching:
    layout: str            # SHARED | REPEATED | PADDED
    reason: str | None     # why the run does not get packed rows with each prompt once, in words; None when it does
    block_mask: bool = False  # the packed row carries a (1, 1, T, T) mask; else position ids alone separate sequences

    @property
    def packed(self) -> bool:
        return self.layout != PADDED

    @property
    def shares_prompt(self) -> bool:
        return self.layout == SHARED

    def describe(self) -> str:
        return self.layout + (f": {self.reason}" if self.reason else "")


def choose(reasons: list[str], attention: str, *, unshared: str | None = None) -> Batching:
    """The batching of a run that ``reasons`` keep from packing (none: it packs) on kernel ``attention``.

    ``unshared``: why this method never shares a prompt between sequences (KTO), or None where it does.
    """
    if reasons:
        return Batching(PADDED, "; ".join(reasons))
    if attention in MASKED_ATTENTION:
        return Batching(REPEATED, unshared, block_mask=True) if unshared else Batching(SHARED, None, block_mask=True)
    if attention in POSITION_ID_ATTENTION:
        return Batching(REPEATED, unshared or f"{attention} takes no block mask, so a prompt cannot be shared "
                                              "between its replies")
    return Batching(PADDED, f"{attention} attention takes neither a block mask nor packed position ids")


def router_reason(model) -> list[str]:
    """A mixture-of-experts model adds an auxiliary loss that only TRL's forward computes."""
    if getattr(model.config.get_text_config(), "output_router_logits", None):
        return ["a mixture-of-experts auxiliary loss needs TRL's forward"]
    return []


def report_batching(method: str, padding_free: bool | None, trainer) -> str:
    """How ``trainer`` batches, in words, printed once; a ``ConfigError`` where padding was ruled out
    (``padding_free: true``) and the packed rows do not apply."""
    from stages.core.errors import ConfigError
    from stages.core.training import is_main_process

    batching = getattr(trainer, "batching", None)
    if batching is None:
        described = f"{PADDED}: data.padding_free is false"
    else:
        described = batching.describe()
        if padding_free and not batching.packed:
            raise ConfigError(f"{method} batches cannot be packed here ({batching.reason})", field="data.padding_free",
                              hint="set data.padding_free: null to fall back to TRL's padded batches")
    if batching is not None and batching.packed and trainer.args.torch_compile:
        # The packed path calls the decoder and the LM head itself (logps.sequence_logps), not the model the
        # trainer compiled: compilation would silently not apply.
        raise ConfigError(f"{method} on packed rows runs the decoder and LM head outside the compiled model, so "
                          "torch.compile would not apply", field="training.compile",
                          hint="set training.compile: false, or data.padding_free: false: TRL's padded batches "
                               "run through the compiled model")
    if is_main_process():
        print(f"lorelay: {method} batches: {described}")
    return described
