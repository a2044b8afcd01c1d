"""Scoring with a reward model: put a reward stage's adapter and score head on the shared base, score conversations.

Used by the reward recipe (training and its evaluation), by generate (judging samples), by the
evaluation block (win rates, for DPO runs and pipeline reports) and by GRPO.

The classifier is ``sequence_classifier`` below: a score head on the very backbone modules
of the causal LM, so scoring needs no second copy of the base. A reward adapter is LoRA plus the head in
``modules_to_save``; ``attach_reward_adapter`` puts it on, ``detach_reward_adapter`` takes it off again.

A conversation is scored at its last token that is not the pad token (how transformers' sequence
classifiers pool). Padding is on the right, so a padded row pools at the same position as the row alone.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from stages.core.errors import LorelayError
from stages.core.lifecycle import borrow
from stages.core.modeling import (Base, LoraSettings, attach_adapter, detach_adapter,
                                  settings_from_adapter)

SCORE_HEAD = "score"  # the head's attribute on transformers' *ForSequenceClassification models



def sequence_classifier(model, tokenizer, *, num_labels: int = 1):
    """A sequence-classification model whose backbone *is* ``model``'s backbone (shared modules).

    The classification wrapper is built on the meta device, so only the new score head allocates
    memory; the decoder layers are the very modules of the causal LM already in memory.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels = num_labels
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
    prefix = classifier.base_model_prefix
    setattr(classifier, prefix, getattr(model, model.base_model_prefix))
    backbone_param = next(model.parameters())
    # The compute dtype the base was loaded in: the hidden states reach the head in it. (Not the first
    # parameter's dtype: with a quantized base that can be a storage dtype, or a layer kept in another one.)
    head_dtype = getattr(model.config, "dtype", None)
    if not isinstance(head_dtype, torch.dtype) or not head_dtype.is_floating_point:
        head_dtype = backbone_param.dtype if backbone_param.dtype.is_floating_point else torch.float32
    classifier.score = torch.nn.Linear(config.hidden_size, num_labels, bias=False,
                                       device=backbone_param.device, dtype=head_dtype)
    torch.nn.init.normal_(classifier.score.weight, std=getattr(config, "initializer_range", 0.02))
    for attr in ("is_quantized", "hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(classifier, attr, getattr(model, attr))
    return classifier


def score(model, tokenizer, conversations: list[list[dict]], *, batch_size: int = 8) -> list[float]:
    """Scalar scores of whole conversations (message lists ending with an assistant turn).

    Each conversation is rendered with the chat template and scored at its last token; batches are
    right-padded with an attention mask, so a score does not depend on the batch it was computed in
    (beyond float rounding: ~1e-6 in float32 on CPU, from kernels that differ with the batch shape).
    The model is put in eval mode for the call and back in its previous mode afterwards.
    """
    sequences = []
    for index, messages in enumerate(conversations):
        try:
            sequences.append(conversation_ids(tokenizer, messages))
        except LorelayError as err:
            raise LorelayError(f"conversation {index}: {err.reason}", hint=err.hint) from None
    return score_ids(model, sequences, batch_size=batch_size)


@contextlib.contextmanager
def reward_model(base: Base, rm_dir: str | Path) -> Iterator[Any]:
    """Put the reward adapter + score head saved in ``rm_dir`` on the shared base; yield the scoring model.

    The model is in eval mode with nothing trainable. The base is borrowed (``stages.core.lifecycle.borrow``):
    on exit it is exactly as before.
    """
    rm_dir = Path(rm_dir)
    if not (rm_dir / "adapter_config.json").exists():
        raise LorelayError("not a reward model directory (no adapter_config.json)", file=rm_dir)
    check_bare(base)
    with borrow(base, rm_dir):
        model, _ = attach_reward_adapter(sequence_classifier(base.model, base.tokenizer), LoraSettings(),
                                         init_from=rm_dir, require_head=True)
        try:
            model.eval()
            for param in model.parameters():
                param.requires_grad_(False)
            yield model
        finally:
            detach_reward_adapter(model)


def conversation_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a whole conversation rendered with the chat template (no generation prompt)."""
    import jinja2

    messages = list(messages)
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise LorelayError("a conversation to score must end with an assistant reply")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except (jinja2.TemplateError, TypeError, ValueError) as err:
        raise LorelayError(f"the chat template refuses this conversation: {err}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def score_ids(model, sequences: Sequence[Sequence[int]], *, batch_size: int) -> list[float]:
    import torch

    if batch_size < 1:
        raise LorelayError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = model.config.get_text_config().pad_token_id
    if pad_id is None:
        raise LorelayError("the reward model has no pad_token_id, so batches cannot be padded",
                           hint="set tokenizer.pad_token before building the model")
    if any(len(ids) == 0 for ids in sequences):
        raise LorelayError("cannot score an empty token sequence")
    device = next(model.parameters()).device
    # Similar lengths together: less padding. Scores go back to the caller's order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(sequences[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, index in enumerate(rows):
                    length = len(sequences[index])
                    input_ids[row, :length] = torch.tensor(sequences[index], dtype=torch.long)
                    attention_mask[row, :length] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               use_cache=False).logits
                for row, index in enumerate(rows):
                    scores[index] = float(logits[row, 0])
    finally:
        model.train(was_training)
    return scores



def attach_reward_adapter(classifier, lora: LoraSettings, *, init_from: str | Path | None = None,
                          require_head: bool = False) -> tuple[Any, dict | None]:
    """A trainable seq-cls LoRA adapter (+ score head in ``modules_to_save``) on ``classifier``.

    ``init_from`` may be a causal adapter (SFT, CPT) or a saved reward adapter. A causal adapter's LoRA
    weights are mapped onto the classifier (key prefixes translated); its weights for modules the classifier
    lacks (``lm_head``) are left out and listed; the score head keeps its fresh initialisation unless the
    adapter has one. ``require_head`` refuses an adapter without a score head (loading a finished RM).
    Returns the PEFT model and, with ``init_from``, what was loaded and what was left out.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if init_from is None:
        return attach_adapter(classifier, lora, task="seq_cls", extra_modules_to_save=[SCORE_HEAD]), None

    # The incoming shape wins; names that exist only on a causal LM (lm_head) have no place here.
    settings = settings_from_adapter(init_from)
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in classifier.named_modules()}
    settings.modules_to_save = [m for m in settings.modules_to_save if m in leaf_names]
    if isinstance(settings.target_modules, list):
        settings.target_modules = [m for m in settings.target_modules if m.rsplit(".", 1)[-1] in leaf_names]
    model = attach_adapter(classifier, settings, task="seq_cls", extra_modules_to_save=[SCORE_HEAD])

    expected = get_peft_model_state_dict(model)  # keys as saved: no adapter name
    saved = load_peft_weights(str(init_from), device=str(next(classifier.parameters()).device))
    weights = {_classifier_key(key, classifier, expected): value for key, value in saved.items()}
    left_out = sorted(key for key in weights if key not in expected)
    weights = {key: value for key, value in weights.items() if key in expected}
    missing = [key for key in expected if key not in weights]
    missing_lora = [key for key in missing if "lora_" in key]
    if missing_lora:
        detach_reward_adapter(model)
        raise LorelayError(f"adapter does not fit this base model ({len(missing_lora)} LoRA weights missing, "
                           f"e.g. {missing_lora[0]})", file=init_from)
    head_missing = [key for key in missing if f".{SCORE_HEAD}." in key]
    if require_head and head_missing:
        detach_reward_adapter(model)
        raise LorelayError("not a reward model: the adapter has no score head", file=init_from,
                           hint="train one with `lorelay rm`")
    # PEFT's loader wants every modules_to_save weight: the ones the adapter lacks keep their current values.
    weights.update({key: expected[key] for key in missing})
    set_peft_model_state_dict(model, weights)
    return model, {"path": str(init_from), "loaded": len(weights) - len(missing),
                   "fresh": sorted(missing), "left_out": left_out}


def _classifier_key(key: str, classifier, expected: dict) -> str:
    """``key`` of a causal adapter renamed for ``classifier`` when their backbone attributes differ.

    ``sequence_classifier`` puts the causal LM's backbone under the classifier's ``base_model_prefix``;
    for most architectures both are ``model`` and keys carry over unchanged.
    """
    head = "base_model.model."
    if key in expected or not key.startswith(head):
        return key
    _, _, rest = key[len(head):].partition(".")
    renamed = f"{head}{classifier.base_model_prefix}.{rest}"
    return renamed if renamed in expected else key


def check_bare(base: Base) -> None:
    """The classifier shares ``base.model``'s modules, so another adapter on them would leak into the RM."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in base.model.modules()):
        raise LorelayError("the shared base still carries an adapter; detach it before building the reward model",
                           hint="call stages.core.modeling.detach_adapter(model) on the stage's PEFT model first")


def detach_reward_adapter(model):
    """Unload the adapter (and the score head, which lives only on the throwaway classifier)."""
    return detach_adapter(model)
