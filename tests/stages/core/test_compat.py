"""Each private name of TRL/transformers that ``stages/core/compat.py`` uses still exists."""

from __future__ import annotations

import inspect

import torch


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
