"""Merging an adapter into full weights that stay faithful to the model that was trained and evaluated.

A QLoRA adapter learned its update against the 4-bit NF4 base, not the full-precision one. Merging it
into the original weights gives a model that was never evaluated: on the tiny test model the logits
move by as much as the quantisation error itself. So, for an adapter trained on a quantized base,
the default merge base is that base *dequantized* to the compute dtype (the NF4 values the adapter
saw), and ``original`` is available on request.

Either way the merged model is checked against the live adapter on the base as it was trained
(quantized where it was trained so) on a few fixed prompts; the largest logit difference goes into the
merged model's ``manifest.json`` and model card, so a user can see how faithful the merge is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from stages.core.errors import LorelayError
from stages.core.lifecycle import use_adapter_vocabulary
from stages.core.modeling import LoraSettings, ModelConfig, attach_adapter, load_base

MergeBase = Literal["auto", "dequantized", "original"]
MERGE_BASES = ("auto", "dequantized", "original")
QUANTIZED = ("4bit", "8bit")

# Fixed prompts: the check must not depend on the stage's data, which a merge may not have at hand.
FIDELITY_PROMPTS = (
    "Route this ticket: my parcel never arrived.",
    "Explain in one sentence what a reward model is.",
    "Write a haiku about autumn rain.",
    "What is 17 times 23?",
)


def resolve_merge_base(requested: str, trained_quantization: str | None) -> str:
    """``auto`` means: dequantized for an adapter trained on a quantized base, original otherwise."""
    if requested not in MERGE_BASES:
        raise LorelayError(f"unknown merge base '{requested}'", field="--base",
                           hint="one of: dequantized (the 4-bit weights the adapter trained on), original")
    quantized = trained_quantization in QUANTIZED
    if requested == "auto":
        return "dequantized" if quantized else "original"
    if requested == "dequantized" and not quantized:
        raise LorelayError(f"this adapter was trained on an unquantized base ({trained_quantization}): there is "
                           "nothing to dequantize", field="--base", hint="use --base original (the default here)")
    return requested


def load_config_of(manifest: dict[str, Any], quantization: str) -> ModelConfig:
    """The stage's base model as recorded in its manifest, loaded with ``quantization``, no checkpointing."""
    base = manifest.get("base_model") or {}
    recorded = (manifest.get("config") or {}).get("model") or {}
    dtype = base.get("dtype") if base.get("dtype") in ("float32", "bfloat16", "float16") else "float32"
    return ModelConfig(name=base.get("name") or recorded.get("name"), revision=recorded.get("revision"),
                       quantization=quantization, dtype=dtype, attn_implementation="sdpa",
                       activation_checkpointing=False,
                       trust_remote_code=bool(recorded.get("trust_remote_code", False)),
                       allow_pickle_weights=bool(recorded.get("allow_pickle_weights", False)))


def prompt_logits(model, tokenizer, prompts=FIDELITY_PROMPTS):
    """Last-layer logits of each prompt rendered with the chat template, one prompt at a time (no padding)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    logits = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            logits.append(model(input_ids=ids.to(device)).logits[0].float().cpu())
    return logits


def max_difference(left, right) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(left, right))


def merged_model(stage_dir: Path, manifest: dict[str, Any], *, base: str = "auto", device: str = "cpu"):
    """(merged transformers model, tokenizer, fidelity record) for a stage's adapter.

    The fidelity record says which base the adapter was merged into and how far the merged model's
    logits are from the adapter on the base as trained, on ``FIDELITY_PROMPTS``.
    """
    trained = (manifest.get("base_model") or {}).get("quantization") or "none"
    choice = resolve_merge_base(base, trained)

    # 1. the model that was trained and evaluated: the adapter on the base as it was loaded then
    reference_base = load_base(load_config_of(manifest, trained), device=device)
    use_adapter_vocabulary(reference_base, stage_dir)  # an adapter trained with new tokens needs their rows
    tokenizer = reference_base.tokenizer
    reference = prompt_logits(attach_adapter(reference_base.model, LoraSettings(), init_from=stage_dir), tokenizer)
    del reference_base

    # 2. the base to merge into
    if choice == "dequantized":
        merge_base = load_base(load_config_of(manifest, trained), device=device)
        use_adapter_vocabulary(merge_base, stage_dir)
        # Before any forward pass: bitsandbytes' CPU backend repacks 4-bit weights in place at the first
        # forward, after which dequantizing them gives wrong values.
        model = merge_base.model.dequantize()
        model.to(merge_base.dtype)
    else:
        merge_base = load_base(load_config_of(manifest, "none"), device=device)
        use_adapter_vocabulary(merge_base, stage_dir)
        model = merge_base.model
    import torch

    with torch.no_grad():
        merged = attach_adapter(model, LoraSettings(), init_from=stage_dir).merge_and_unload()
    merged.config.use_cache = True  # the training load turned the KV cache off; generation wants it
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config  # the weights are full precision now
    difference = max_difference(prompt_logits(merged, tokenizer), reference)
    fidelity = {"merge_base": choice, "trained_quantization": trained,
                "reference": f"adapter on the {trained if trained in QUANTIZED else 'unquantized'} base",
                "prompts": len(FIDELITY_PROMPTS), "max_logit_diff": difference,
                "logit_scale": max(float(r.abs().max()) for r in reference)}
    return merged, tokenizer, fidelity
