"""Every place lorelay relies on a private part of TRL, transformers or PEFT, in one module.

Written against trl 1.16, transformers 5.24 and peft 0.21 (pinned in pyproject.toml).
``tests/stages/core/test_compat.py`` checks each function here against the installed libraries and, when
an upgrade removes what one touches, fails with "<library> <version> no longer has ...; lorelay's
compat.<function> needs updating". Nothing else in lorelay reads a library's ``_private`` names, overrides
a trainer method, or spells TRL's internal column and adapter names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

# ----------------------------------------------------------------------------------------------
# Models and the packed preference trainers (DPO, ORPO, KTO, reward model)
# ----------------------------------------------------------------------------------------------


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
    metrics = trl_metrics(trainer, mode)
    for key, value in values.items():
        metrics[key].append(value)


def count_train_tokens(trainer, tokens: int, mode: str = "train") -> None:
    """Add ``tokens`` (in training) to TRL's running ``num_tokens`` count (``trainer._total_train_tokens``)
    and log it in ``mode``, as TRL's own ``compute_loss`` does in training and evaluation."""
    if mode == "train":
        trainer._total_train_tokens += tokens
    trl_metrics(trainer, mode)["num_tokens"] = [trainer._total_train_tokens]


def tensor_parallel_size(trainer) -> int:
    """TRL's tensor-parallel degree (``trainer._tp_size``): a token count gathered over all processes
    repeats each token that many times."""
    return trainer._tp_size


class _PackedInit:
    """``__init__`` of a TRL trainer on packed rows: ``self.batching`` is chosen (``step.choose_batching``)
    before TRL's ``__init__`` runs; the packed collator goes in with it (TRL's reference precompute, run in
    ``__init__``, collates with it) or, for trainers whose ``__init__`` sets up what the collator reads
    (``collator_after_init``), replaces TRL's after it."""

    step: Any = None                 # the method's module in stages.core.preference
    collator_after_init = False

    def __init__(self, model, *positional, args=None, data_collator=None, **keywords):
        self.batching = self.step.choose_batching(model, args, attention_implementation(model))
        swap = self.batching.packed and data_collator is None
        if swap and not self.collator_after_init:
            data_collator = self.step.collator(self.batching, args, model)
        super().__init__(model, *positional, args=args, data_collator=data_collator, **keywords)
        if swap and self.collator_after_init:
            self.data_collator = self.step.collator(self.batching, args, model)


class _PackedLoss:
    """``compute_loss`` on packed rows (``step.loss_and_metrics``), logged into TRL's own metric buffers;
    TRL's ``compute_loss`` where the run is padded."""

    step: Any = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.batching.packed:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        loss, metrics, row_tokens, outputs = self.step.loss_and_metrics(self, model, inputs)
        if return_outputs and outputs is None:  # only with compute_metrics, which the stages never pass
            raise NotImplementedError("packed preference batches have no per-position logits to return to "
                                      "compute_metrics (deprecated in TRL); set data.padding_free: false")
        log_trainer_metrics(self, mode, metrics)
        if mode == "train":
            count_train_tokens(self, row_tokens // tensor_parallel_size(self))
        return (loss, outputs) if return_outputs else loss


class _PackedReference:
    """``compute_ref_log_probs``: TRL's ``precompute_ref_log_probs`` pass collates with the packed collator,
    so it reads the reference log-probs from packed rows too. ``model`` is the reference model, or the policy
    whose adapter is switched off; the step finds which from the trainer, as ``compute_loss`` does."""

    def compute_ref_log_probs(self, model, inputs):
        if not self.batching.packed:
            return super().compute_ref_log_probs(model, inputs)
        return self.step.reference_logps(self.model, self.ref_model, inputs)


@functools.cache
def packed_dpo_trainer():
    """TRL's ``DPOTrainer`` on lorelay's packed preference rows (``stages.core.preference.dpo_step``).

    Overrides ``__init__`` (packed collator), ``compute_loss`` and ``compute_ref_log_probs``. Where the packed
    path does not apply (``dpo_step.choose_batching``), every method is TRL's; ``trainer.batching`` says which
    ran and why.
    """
    from trl import DPOTrainer

    from stages.core.preference import dpo_step

    return type("PackedDPOTrainer", (_PackedInit, _PackedLoss, _PackedReference, DPOTrainer), {"step": dpo_step})


@functools.cache
def packed_kto_trainer():
    """TRL's ``KTOTrainer`` on packed rows (``stages.core.preference.kto_step``): the same three overrides."""
    from trl import KTOTrainer

    from stages.core.preference import kto_step

    return type("PackedKTOTrainer", (_PackedInit, _PackedLoss, _PackedReference, KTOTrainer), {"step": kto_step})


@functools.cache
def packed_reward_trainer():
    """TRL's ``RewardTrainer`` on packed pairs (``stages.core.preference.reward_step``): ``compute_loss``, and
    the collator set after TRL's ``__init__`` has fixed the pad token the scores are pooled by."""
    from trl import RewardTrainer

    from stages.core.preference import reward_step

    return type("PackedRewardTrainer", (_PackedInit, _PackedLoss, RewardTrainer),
                {"step": reward_step, "collator_after_init": True})


@functools.cache
def packed_orpo_trainer():
    """TRL's experimental ``ORPOTrainer`` on packed pairs (``stages.core.preference.orpo_step``).

    ORPO has no ``compute_loss`` of the usual shape: both its ``compute_loss`` and its ``prediction_step``
    call ``get_batch_loss_metrics(model, batch, train_eval)`` and store the metrics it returns, so that is
    what is overridden. Its collator is swapped after ``__init__``: given one, ORPO warns at every eval step.
    """
    from trl.experimental.orpo import ORPOTrainer

    from stages.core.preference import orpo_step

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        if not self.batching.packed:
            return ORPOTrainer.get_batch_loss_metrics(self, model, batch, train_eval=train_eval)
        return orpo_step.loss_and_metrics(self, model, batch, train_eval)

    return type("PackedORPOTrainer", (_PackedInit, ORPOTrainer),
                {"step": orpo_step, "collator_after_init": True, "get_batch_loss_metrics": get_batch_loss_metrics})


def packed_preference_trainer(method: str):
    """The packed trainer of a preference method: ``dpo``, ``orpo``, ``kto`` or ``rm``."""
    return {"dpo": packed_dpo_trainer, "orpo": packed_orpo_trainer, "kto": packed_kto_trainer,
            "rm": packed_reward_trainer}[method]()


# ----------------------------------------------------------------------------------------------
# Trainer internals (transformers.Trainer, TRL's trainers)
# ----------------------------------------------------------------------------------------------


def save_checkpoint_now(trainer) -> None:
    """Write a full checkpoint (weights, optimizer, scheduler, RNG, trainer state) at the current step,
    outside the training loop. transformers has no public method for it: ``Trainer._save_checkpoint`` is
    what its own loop calls (``save_model`` writes the weights only)."""
    trainer._save_checkpoint(trainer.model, trial=None)


def watch_training_step(trainer, observe: Callable[[Any], None]) -> Callable[[], None]:
    """Show the loss of every micro-batch to ``observe`` (no callback event carries it: ``on_log`` sees
    averages, ``on_pre_optimizer_step`` none). Wraps the instance's ``training_step``; the returned
    function takes the wrapper off again."""
    original, shadowed = trainer.training_step, vars(trainer).get("training_step")

    def training_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        observe(loss)
        return loss

    trainer.training_step = training_step

    def unwatch() -> None:
        if shadowed is None:
            vars(trainer).pop("training_step", None)
        else:
            trainer.training_step = shadowed

    return unwatch


def trainer_with_loss(trainer_class: type, loss: Callable[..., Any], name: str | None = None) -> type:
    """``trainer_class`` with ``compute_loss`` replaced where ``loss(trainer, model, inputs,
    num_items_in_batch)`` returns a loss; where it returns None (or outputs are asked for), the class's
    own ``compute_loss`` runs unchanged. transformers' Trainer documents overriding ``compute_loss``;
    its keyword ``num_items_in_batch`` is what this relies on."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = None if return_outputs else loss(self, model, inputs, num_items_in_batch)
        if result is None:
            return super(subclass, self).compute_loss(model, inputs, return_outputs=return_outputs,
                                                      num_items_in_batch=num_items_in_batch)
        return result

    subclass = type(name or f"Lorelay{trainer_class.__name__}", (trainer_class,), {"compute_loss": compute_loss})
    return subclass


def trl_metrics(trainer, mode: str) -> dict[str, list[float]]:
    """TRL's per-step metric buffer (``trainer._metrics[mode]``, mode ``train`` or ``eval``): the values
    its ``compute_loss`` collected since the last log step, which TRL averages and logs."""
    return trainer._metrics[mode]


# ----------------------------------------------------------------------------------------------
# TRL's names: tokenized columns, loss types
# ----------------------------------------------------------------------------------------------

# The tokenized columns TRL's trainers read (and, for preferences, write): SFT's ids and loss mask; the
# RewardTrainer's and DPOTrainer's two sides of a pair; DPO/KTO's prompt, and KTO's single completion.
ASSISTANT_MASKS = "assistant_masks"
CHOSEN_IDS, REJECTED_IDS = "chosen_ids", "rejected_ids"
PROMPT_IDS = "prompt_ids"
KTO_COMPLETION_IDS = "completion_ids"
COMPLETION_IDS = (CHOSEN_IDS, REJECTED_IDS, KTO_COMPLETION_IDS)
# KTOTrainer's other columns: the mismatched completion its KL term is estimated from (each example's
# completion rotated by one within a batch), the label, and its precomputed reference log-probs.
KTO_KL_COMPLETION_IDS, KTO_LABEL = "KL_completion_ids", "label"
KTO_REF_LOGPS, KTO_REF_KL_LOGPS = "ref_logps", "ref_KL_logps"
# ORPOTrainer (trl.experimental) tokenizes each side whole, prompt included, labelling the prompt part -100.
ORPO_SIDES = (("chosen_input_ids", "chosen_labels"), ("rejected_input_ids", "rejected_labels"))
ORPO_IGNORED_LABEL = -100


@functools.cache
def dpo_loss_types() -> tuple[str, ...]:
    """The ``loss_type`` values TRL's DPOConfig accepts. TRL has no list of them in code (DPOTrainer
    branches on each name); the field's help text lists them as `'name'`, and that is read here."""
    import dataclasses

    from trl import DPOConfig

    help_text = {f.name: f for f in dataclasses.fields(DPOConfig)}["loss_type"].metadata.get("help", "")
    names = tuple(dict.fromkeys(re.findall(r"`'([a-z_]+)'`", help_text)))
    if not names:
        raise RuntimeError("trl's DPOConfig.loss_type help no longer lists the loss types; "
                           "lorelay's compat.dpo_loss_types needs updating")
    return names


@functools.cache
def kto_loss_types() -> tuple[str, ...]:
    """The ``loss_type`` choices of TRL's KTOConfig (its field metadata)."""
    import dataclasses

    from trl import KTOConfig

    field = {f.name: f for f in dataclasses.fields(KTOConfig)}["loss_type"]
    return tuple(field.metadata["choices"])


def keep_trainables_in_compute_dtype(model) -> list[str]:
    """Undo TRL's bf16 cast of a quantized model's trainable parameters where compute is not bf16.

    Every TRL 1.16 trainer's ``__init__`` casts all trainable parameters of a quantized model to bf16 (the QLoRA
    paper's recipe), whatever the compute dtype. With 4-bit weights and fp32 compute (CPU), a bf16 score head
    then meets fp32 hidden states and the reward model fails; LoRA weights lose precision for nothing. Returns
    the names cast back to the compute dtype (``model.config.dtype``).
    """
    import torch

    compute = getattr(getattr(model, "config", None), "dtype", None)
    if not getattr(model, "is_quantized", False):  # a PeftModel answers for its base model
        return []
    if not isinstance(compute, torch.dtype) or compute == torch.bfloat16 or not compute.is_floating_point:
        return []
    cast = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype == torch.bfloat16:
            parameter.data = parameter.data.to(compute)
            cast.append(name)
    return cast


# ----------------------------------------------------------------------------------------------
# transformers' choice of tokenizer class
# ----------------------------------------------------------------------------------------------

# Model types for which AutoTokenizer uses the tokenizer class transformers registers for the type, whatever
# class the repository's tokenizer_config.json declares (transformers 5.24's MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
# in models/auto/tokenization_auto.py). Copied rather than imported: importing that module imports torch, which
# ``stages.core.tokenizer_loading`` avoids for commands that only tokenize.
AUTO_TOKENIZER_OVERRIDDEN_TYPES = frozenset({
    "arctic", "camembertv2-base", "chatlm", "cohere_asr", "ernie4_5", "ernie4_5_moe", "fuyu", "h2ovl_chat",
    "hyperclovax", "hyperclovax_vision_v2", "hyperclovax_vlm", "internlm2", "internlm3", "iquestcoder",
    "jamba", "llava", "llava_next", "minicpm3", "minicpmv", "minimax_m2", "modernbert", "modernbert-decoder",
    "molmo", "molmo2", "nemotron", "nvfp4", "opencua", "openvla", "paddleocr_vl", "phi3", "phi3_v", "phimoe",
    "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp", "siglip2", "smolvlm", "step3_vl",
    "vipllava",
})
