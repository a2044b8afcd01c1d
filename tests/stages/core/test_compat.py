"""stages.core.compat: each private name lorelay touches still exists in the installed TRL, transformers and
PEFT. A failure names the library version and the compat function to update. (The behaviour behind each one
is proven where it is used: tests/stages/core/training/test_losses.py, tests/reliability/, tests/stages/test_dpo.py.)"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import inspect

import pytest
import torch
import transformers
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardTrainer, SFTTrainer

from stages.core import compat


def outdated(library: str, what: str, function: str) -> str:
    version = importlib.metadata.version(library)
    return f"{library} {version} no longer has {what}; lorelay's compat.{function} needs updating"


def source_of(cls_or_module) -> str:
    return inspect.getsource(inspect.getmodule(cls_or_module))


def test_attention_implementation_is_read_from_the_model_config(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from stages.core.compat import attention_implementation

    for kernel in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=kernel)
        assert attention_implementation(model) == kernel, (
            "transformers no longer keeps the attention kernel in config._attn_implementation; update "
            "stages.core.compat.attention_implementation")


def test_dpo_trainer_still_has_what_the_packed_trainer_overrides_and_logs():
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer)
    for method in ("compute_loss", "compute_ref_log_probs", "_precompute_ref_logps"):
        assert hasattr(DPOTrainer, method), f"TRL's DPOTrainer has no {method}: update stages.core.compat.packed_dpo_trainer"
    for attribute in ("self._metrics[mode]", "self._total_train_tokens", "self._tp_size", "self.loss_types",
                      "self.loss_weights", "self.ref_model"):
        assert attribute in source, f"TRL's DPOTrainer no longer uses {attribute}: update stages.core.compat"
    assert "self.compute_ref_log_probs(model, padded_batch)" in source, (
        "TRL's reference precompute no longer calls compute_ref_log_probs per collated batch: the packed "
        "trainer's override would be skipped")


def test_trl_still_names_its_reference_adapter_copy_ref():
    from trl import GRPOTrainer

    from stages.core.compat import TRL_REFERENCE_ADAPTER

    source = inspect.getsource(GRPOTrainer.__init__)
    assert f'model.add_adapter("{TRL_REFERENCE_ADAPTER}"' in source, (
        "TRL's GRPOTrainer no longer adds its reference adapter copy under this name: update "
        "stages.core.compat.TRL_REFERENCE_ADAPTER")
    assert f'use_adapter(model, adapter_name="{TRL_REFERENCE_ADAPTER}"' in inspect.getsource(GRPOTrainer), (
        "TRL's GRPOTrainer no longer switches to the reference adapter by this name: update stages.core.compat")


def test_save_checkpoint_now_calls_the_trainers_own_checkpoint_writer():
    method = getattr(transformers.Trainer, "_save_checkpoint", None)
    assert method is not None, outdated("transformers", "Trainer._save_checkpoint", "save_checkpoint_now")
    assert list(inspect.signature(method).parameters)[:3] == ["self", "model", "trial"], \
        outdated("transformers", "Trainer._save_checkpoint(model, trial)", "save_checkpoint_now")


def test_watch_training_step_sees_every_loss_and_unwatches():
    parameters = inspect.signature(transformers.Trainer.training_step).parameters
    assert list(parameters)[1:3] == ["model", "inputs"], \
        outdated("transformers", "Trainer.training_step(model, inputs, ...)", "watch_training_step")

    class Stepper:
        def training_step(self, model, inputs, num_items_in_batch=None):
            return inputs * 2

    stepper, seen = Stepper(), []
    unwatch = compat.watch_training_step(stepper, seen.append)
    assert [stepper.training_step(None, 1), stepper.training_step(None, 3)] == [2, 6] and seen == [2, 6]
    unwatch()
    stepper.training_step(None, 5)
    assert seen == [2, 6] and "training_step" not in vars(stepper)


def test_trainer_with_loss_overrides_compute_loss_and_falls_back():
    parameters = inspect.signature(SFTTrainer.compute_loss).parameters
    assert {"model", "inputs", "return_outputs", "num_items_in_batch"} <= set(parameters), \
        outdated("trl", "SFTTrainer.compute_loss(model, inputs, return_outputs, num_items_in_batch)",
                 "trainer_with_loss")

    class Base:
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return ("library", inputs)

    own = compat.trainer_with_loss(Base, lambda trainer, model, inputs, n: "lorelay" if inputs > 0 else None)
    assert own().compute_loss(None, 1) == "lorelay"
    assert own().compute_loss(None, -1) == ("library", -1)
    assert own().compute_loss(None, 1, return_outputs=True) == ("library", 1)  # outputs: the library's path


def test_trl_metric_buffers_exist_on_the_sft_trainer():
    source = inspect.getsource(SFTTrainer)
    for name, function in (("self._metrics = ", "trl_metrics"), ("self._total_train_tokens", "count_train_tokens"),
                           ("self._tp_size", "tensor_parallel_size")):
        assert name in source, outdated("trl", f"SFTTrainer.{name.split('.')[1].split(' ')[0]}", function)

    class Trainer:  # the buffers as SFTTrainer sets them up
        _metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
        _total_train_tokens, _tp_size = 10, 2

    compat.log_trainer_metrics(Trainer, "train", {"entropy": 0.5})
    compat.count_train_tokens(Trainer, 8 // compat.tensor_parallel_size(Trainer))
    compat.count_train_tokens(Trainer, 0, "eval")  # evaluation logs the count, adds nothing
    assert compat.trl_metrics(Trainer, "train") == {"entropy": [0.5], "num_tokens": [14]}
    assert compat.trl_metrics(Trainer, "eval") == {"num_tokens": [14]}


@pytest.mark.parametrize("trainer", [DPOTrainer, KTOTrainer])
def test_the_reference_adapter_name_is_trls(trainer):
    assert f'add_adapter("{compat.TRL_REFERENCE_ADAPTER}"' in source_of(trainer), \
        outdated("trl", f"{trainer.__name__}'s reference adapter '{compat.TRL_REFERENCE_ADAPTER}'", "TRL_REFERENCE_ADAPTER")


@pytest.mark.parametrize("trainer, columns", [
    (SFTTrainer, [compat.ASSISTANT_MASKS]),
    (RewardTrainer, [compat.CHOSEN_IDS, compat.REJECTED_IDS]),
    (DPOTrainer, [compat.PROMPT_IDS, compat.CHOSEN_IDS, compat.REJECTED_IDS]),
    (KTOTrainer, [compat.PROMPT_IDS, compat.KTO_COMPLETION_IDS]),
])
def test_tokenized_column_names_are_trls(trainer, columns):
    source = source_of(trainer)
    for column in columns:
        assert f'"{column}"' in source, outdated("trl", f"the tokenized column '{column}' in {trainer.__name__}",
                                                 "the column names (ASSISTANT_MASKS, CHOSEN_IDS, ...)")


def test_dpo_loss_types_come_from_trls_config_and_each_is_implemented():
    names = compat.dpo_loss_types()
    assert "sigmoid" in names and len(names) >= 10, outdated("trl", "the loss list in DPOConfig.loss_type's help",
                                                             "dpo_loss_types")
    source = source_of(DPOTrainer)
    unhandled = [name for name in names if f'loss_type == "{name}"' not in source]
    assert not unhandled, outdated("trl", f"DPOTrainer branches for {unhandled}", "dpo_loss_types")
    assert DPOConfig(output_dir="unused", loss_type=[names[-1]], use_cpu=True).loss_type == [names[-1]]


def test_kto_loss_types_are_the_configs_choices():
    field = {f.name: f for f in dataclasses.fields(KTOConfig)}.get("loss_type")
    assert field is not None and "choices" in field.metadata, \
        outdated("trl", "KTOConfig.loss_type's choices", "kto_loss_types")
    assert compat.kto_loss_types() == tuple(field.metadata["choices"])
    assert field.default in compat.kto_loss_types()


def test_trl_still_casts_a_quantized_models_trainables_to_bf16_which_lorelay_undoes_for_fp32_compute():
    """keep_trainables_in_compute_dtype exists because of this cast; if TRL drops it, the undo is a no-op to remove."""
    from trl import RewardTrainer, SFTTrainer

    for trainer in (SFTTrainer, RewardTrainer):
        source = inspect.getsource(trainer.__init__)
        assert "param.data = param.data.to(torch.bfloat16)" in source, (
            f"TRL's {trainer.__name__} no longer casts a quantized model's trainable parameters to bf16: "
            "stages.core.compat.keep_trainables_in_compute_dtype can go")


def test_trainables_of_a_quantized_fp32_model_go_back_to_fp32(tiny_model_dir):
    import torch

    from stages.core.compat import keep_trainables_in_compute_dtype
    from stages.core.modeling import LoraSettings, ModelConfig, attach_adapter, load_base

    base = load_base(ModelConfig(name=str(tiny_model_dir), quantization="4bit", dtype="float32"), device="cpu")
    model = attach_adapter(base.model, LoraSettings(r=4, alpha=8))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)  # what TRL's __init__ does
    cast = keep_trainables_in_compute_dtype(model)
    assert cast and all("lora_" in name for name in cast)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_orpo_trainer_still_routes_train_and_eval_through_get_batch_loss_metrics():
    from trl.experimental.orpo import ORPOTrainer

    parameters = list(inspect.signature(ORPOTrainer.get_batch_loss_metrics).parameters)
    assert parameters[:4] == ["self", "model", "batch", "train_eval"], \
        outdated("trl", "ORPOTrainer.get_batch_loss_metrics(model, batch, train_eval)", "packed_orpo_trainer")
    for method in (ORPOTrainer.compute_loss, ORPOTrainer.prediction_step):
        assert "self.get_batch_loss_metrics(model, inputs" in inspect.getsource(method), outdated(
            "trl", f"ORPOTrainer.{method.__name__} calling get_batch_loss_metrics", "packed_orpo_trainer")


def test_orpo_tokenizes_each_side_whole_with_its_prompt_labelled_ignored(tokenizer):
    """``compat.ORPO_SIDES``: TRL's ORPO row holds each side's ids, prompt included, and labels that are the
    ids with the prompt part set to ``ORPO_IGNORED_LABEL``."""
    import types

    from trl.experimental.orpo import ORPOTrainer

    trainer = types.SimpleNamespace(processing_class=tokenizer, is_encoder_decoder=False, max_length=512)
    trainer.build_tokenized_answer = lambda prompt, answer: ORPOTrainer.build_tokenized_answer(trainer, prompt, answer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    row = ORPOTrainer.tokenize_row(trainer, {"prompt": prompt, "chosen": "Hello.", "rejected": "Go away."})
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for ids_key, labels_key in compat.ORPO_SIDES:
        assert ids_key in row and labels_key in row, outdated("trl", f"ORPO's tokenized '{ids_key}'/'{labels_key}'",
                                                              "ORPO_SIDES")
        ids, labels = row[ids_key], row[labels_key]
        assert ids[:len(prompt_ids)] == prompt_ids and len(labels) == len(ids)
        assert labels[:len(prompt_ids)] == [compat.ORPO_IGNORED_LABEL] * len(prompt_ids), \
            outdated("trl", "ORPO's prompt labels of -100", "ORPO_IGNORED_LABEL")
        assert labels[len(prompt_ids):] == ids[len(prompt_ids):]


def test_reward_trainer_sets_the_pad_token_the_packed_collator_pools_by():
    source = inspect.getsource(RewardTrainer.__init__)
    assert "model.config.get_text_config().pad_token_id = processing_class.pad_token_id" in source, outdated(
        "trl", "RewardTrainer.__init__ setting the model's pad_token_id", "packed_reward_trainer")
    assert "self._metrics = " in inspect.getsource(RewardTrainer) and "self._total_train_tokens" in source, \
        outdated("trl", "RewardTrainer's metric buffers", "packed_reward_trainer")


def test_kto_trainer_still_has_what_the_packed_trainer_overrides_and_reads():
    assert list(inspect.signature(KTOTrainer.compute_ref_log_probs).parameters) == ["self", "model", "inputs"], \
        outdated("trl", "KTOTrainer.compute_ref_log_probs(model, inputs)", "packed_kto_trainer")
    precompute = inspect.getsource(KTOTrainer._precompute_ref_logps)
    assert "self.compute_ref_log_probs(model, padded_batch)" in precompute, outdated(
        "trl", "a reference precompute that calls compute_ref_log_probs per collated batch", "packed_kto_trainer")
    source = source_of(KTOTrainer)
    for column in (compat.KTO_KL_COMPLETION_IDS, compat.KTO_LABEL, compat.KTO_REF_LOGPS, compat.KTO_REF_KL_LOGPS):
        assert f'"{column}"' in source, outdated("trl", f"KTO's column '{column}'", "the KTO_* column names")
    for attribute in ("self._metrics[mode]", "self._total_train_tokens", "self._tp_size", "self.ref_model"):
        assert attribute in source, outdated("trl", f"KTOTrainer's {attribute}", "packed_kto_trainer")


def test_the_packed_trainers_are_trls_with_lorelays_overrides():
    from trl.experimental.orpo import ORPOTrainer

    for method, library in (("dpo", DPOTrainer), ("orpo", ORPOTrainer), ("kto", KTOTrainer), ("rm", RewardTrainer)):
        trainer = compat.packed_preference_trainer(method)
        step = {"rm": "reward"}.get(method, method)
        assert issubclass(trainer, library) and trainer.step.__name__.endswith(f"{step}_step")


def test_the_model_types_whose_tokenizer_class_autotokenizer_overrides_are_transformers_own():
    """tokenizer_loading skips AutoTokenizer (and torch) only for tokenizers AutoTokenizer would load as the
    generic class; the model types it overrides whatever the files declare are copied in compat."""
    from transformers.models.auto import tokenization_auto

    library = getattr(tokenization_auto, "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS", None)
    assert library is not None, outdated("transformers", "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS",
                                         "AUTO_TOKENIZER_OVERRIDDEN_TYPES")
    assert compat.AUTO_TOKENIZER_OVERRIDDEN_TYPES == frozenset(library), (
        f"transformers {transformers.__version__} overrides the declared tokenizer class of other model types "
        f"(added {sorted(set(library) - compat.AUTO_TOKENIZER_OVERRIDDEN_TYPES)}, removed "
        f"{sorted(compat.AUTO_TOKENIZER_OVERRIDDEN_TYPES - set(library))}); "
        "update compat.AUTO_TOKENIZER_OVERRIDDEN_TYPES")
