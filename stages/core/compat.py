"""Every use of a private name of TRL, transformers or PEFT, in one place, each checked by
``tests/stages/core/test_compat.py`` so that a library upgrade that removes one fails with a clear message.
"""

from __future__ import annotations

import functools


def attention_implementation(model) -> str:
    """The attention kernel a loaded model runs (transformers keeps it in ``config._attn_implementation``)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


# TRL's DPO/KTO/GRPO trainers, given a PeftModel that already has an adapter and no ref_model, copy that adapter
# under this name and switch to it for the reference forward (trl/trainer/grpo_trainer.py, dpo_trainer.py).
TRL_REFERENCE_ADAPTER = "ref"


def has_reference_adapter(model) -> bool:
    """Whether TRL put its frozen reference copy of the policy adapter on ``model``."""
    return TRL_REFERENCE_ADAPTER in getattr(model, "peft_config", {})


def log_trainer_metrics(trainer, mode: str, values: dict[str, float]) -> None:
    """Append to the per-step metrics TRL's trainers average and log (``trainer._metrics[mode]``)."""
    metrics = trainer._metrics[mode]
    for key, value in values.items():
        metrics[key].append(value)


def count_train_tokens(trainer, tokens: int) -> None:
    """Add to TRL's running ``num_tokens`` count (``trainer._total_train_tokens``) and log it."""
    trainer._total_train_tokens += tokens
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]


@functools.cache
def packed_dpo_trainer():
    """TRL's ``DPOTrainer`` on lorelay's packed preference rows (``stages.core.preference``).

    Overrides ``__init__`` (packed collator), ``compute_loss`` and ``compute_ref_log_probs`` (TRL's
    ``precompute_ref_log_probs`` pass runs through the packed collator too). Where the packed path does not
    apply (``dpo_step.choose_batching``), every method is TRL's; ``trainer.batching`` says which ran and why.
    """
    from trl import DPOTrainer

    from stages.core.preference import dpo_step

    class PackedDPOTrainer(DPOTrainer):
        def __init__(self, model, *positional, args=None, data_collator=None, **keywords):
            self.batching = dpo_step.choose_batching(model, args, attention_implementation(model))
            if self.batching.packed and data_collator is None:
                data_collator = dpo_step.collator(self.batching, args)
            super().__init__(model, *positional, args=args, data_collator=data_collator, **keywords)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.batching.packed:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            if return_outputs:  # only with a compute_metrics function, which the stage never passes
                raise NotImplementedError("packed DPO batches have no per-position logits to return to "
                                          "compute_metrics (deprecated in TRL); set data.padding_free: false")
            mode = "train" if self.model.training else "eval"
            loss, metrics, row_tokens = dpo_step.loss_and_metrics(self, model, inputs)
            log_trainer_metrics(self, mode, metrics)
            if mode == "train":
                count_train_tokens(self, row_tokens // self._tp_size)
            return loss

        def compute_ref_log_probs(self, model, inputs):
            # TRL's precompute pass: ``model`` is the reference model, or the policy whose adapter is switched off
            if not self.batching.packed:
                return super().compute_ref_log_probs(model, inputs)
            return dpo_step.reference_logps(self.model, self.ref_model, inputs)

    return PackedDPOTrainer
