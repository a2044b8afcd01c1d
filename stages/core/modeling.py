"""Loading the one shared base model, and putting LoRA adapters on and off it.

A pipeline loads its base once. Each stage wraps that same object in a PEFT adapter, trains, saves
the adapter, and unwraps it again (``peft.unload`` removes the LoRA layers without merging), so the
next stage finds the base as it was loaded. The reward model's score head is a small module put on
the same backbone modules (``sequence_classifier``): no stage ever holds a second copy of the base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

from stages.core.config import field
from stages.core.default_model import DEFAULT_MODEL, resolve_model_path
from stages.core.errors import ConfigError, LorelayError, closest, first_line
from stages.core.tokenizer_loading import load_tokenizer

Quantization = Literal["auto", "4bit", "8bit", "none"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Attention = Literal["auto", "sdpa_packed", "sdpa", "eager", "flash_attention_2"]


@dataclasses.dataclass
class LoraSettings:
    r: int = field(16, help="LoRA rank.")
    alpha: int = field(32, help="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    # 0 by default (as torchtune and LLaMA-Factory): a non-zero dropout keeps a dropped-out copy of every
    # adapted layer's input for the backward pass, a quarter more memory in the SFT benchmark (bench/README.md).
    dropout: float = field(0.0, help="Dropout on the LoRA input (costs a copy of each adapted layer's input).")
    target_modules: list[str] | str = field("all-linear",
                                            help="Module names to adapt, or 'all-linear' (every linear layer but the LM head).")
    modules_to_save: list[str] = field(default_factory=list,
                                       help="Modules trained in full and saved with the adapter, e.g. [embed_tokens, lm_head].")
    use_rslora: bool = field(False, help="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = field(False, help="Weight-decomposed LoRA (slower, sometimes better).")

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError("must be a positive integer", field="r")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("must be in [0, 1)", field="dropout")


@dataclasses.dataclass
class ModelConfig:
    name: str = field(DEFAULT_MODEL, help="Hub id, local directory, or 'embedded:smollm2-135m-instruct' (bundled).")
    revision: str | None = field(None, help="Hub revision (branch, tag or commit) when `name` is a Hub id.")
    quantization: Quantization = field("auto", help="auto: 4-bit NF4 on CUDA, none on CPU.")
    dtype: DType = field("auto", help="Weights/compute dtype. auto: bfloat16 on CUDA with bf16 support, else float32.")
    attn_implementation: Attention = field(
        "auto", help="auto: flash_attention_2 when installed on CUDA, else sdpa_packed (sdpa once per packed sequence).")
    activation_checkpointing: bool | Literal["auto"] = field(
        "auto", help="Recompute activations in backward to save memory. auto: on with CUDA, off on CPU (where it only costs time).")
    chat_template: Path | None = field(None, help="Jinja file that replaces the tokenizer's chat template.")
    trust_remote_code: bool = field(False, help="Run model code from the checkpoint's repository. Off unless you trust it.")
    allow_pickle_weights: bool = field(False, help="Load .bin/.pt weights (pickle). Refused by default: safetensors only.")


@dataclasses.dataclass
class Base:
    """The loaded base model and what later code needs to know about it."""

    model: Any                  # transformers PreTrainedModel; never a PeftModel between stages
    tokenizer: Any
    config: ModelConfig
    path: str                   # resolved local directory or Hub id
    fingerprint: str            # hash of the weight files (or id@revision for the Hub)
    device: str
    dtype: Any
    quantization: str           # effective: "4bit" | "8bit" | "none"
    attn_implementation: str
    activation_checkpointing: bool
    template_source: str = "tokenizer"

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"


# ----------------------------------------------------------------------------------------------
# resolving "auto" settings
# ----------------------------------------------------------------------------------------------

def local_device() -> str:
    """This process's device: its local GPU under `accelerate launch`, else cuda:0, else cpu."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def resolve_settings(config: ModelConfig, device: str) -> tuple[str, Any, str, bool]:
    """(quantization, torch dtype, attention implementation, activation checkpointing) for ``device``."""
    import torch

    on_cuda = device.startswith("cuda")
    quantization = config.quantization
    if quantization == "auto":
        quantization = "4bit" if on_cuda else "none"
    if config.dtype == "auto":
        dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    attention = config.attn_implementation
    if attention == "auto":
        attention = "flash_attention_2" if on_cuda and _flash_attn_installed() else "sdpa_packed"
    if attention == "flash_attention_2" and not on_cuda:
        raise ConfigError("flash_attention_2 needs a CUDA device", field="model.attn_implementation",
                          hint="use sdpa or auto")
    checkpointing = config.activation_checkpointing
    if checkpointing == "auto":
        checkpointing = on_cuda
    return quantization, dtype, attention, bool(checkpointing)


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------

def load_base(config: ModelConfig, *, device: str | None = None) -> Base:
    """Load the base model once, quantized as configured, ready for adapters."""
    from transformers import AutoModelForCausalLM

    device = device or local_device()
    quantization, dtype, attention, checkpointing = resolve_settings(config, device)
    path, use_safetensors = check_model_files(config)
    if config.trust_remote_code:
        warnings.warn(f"trust_remote_code is on: code from '{path}' will run on this machine.", stacklevel=2)
    tokenizer, template_source = load_tokenizer(path, config)

    if attention == "sdpa_packed":
        from stages.core import attention as packed_attention

        packed_attention.register()
    kwargs: dict[str, Any] = dict(dtype=dtype, attn_implementation=attention, revision=config.revision,
                                  trust_remote_code=config.trust_remote_code, use_safetensors=use_safetensors)
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, dtype, device)
        # QLoRA under DDP: every rank loads its own copy onto its own device, never device_map="auto".
        kwargs["device_map"] = {"": device}
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SafetensorError as err:
        raise LorelayError(f"unreadable weights ({first_line(err)})", file=path, field="model.name",
                           hint="the checkpoint is damaged or incomplete: copy, download or convert it again") from None
    except OSError as err:
        raise LorelayError(f"cannot load the model: {first_line(err)}", file=path, field="model.name") from None
    if quantization == "none":
        model.to(device)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    for param in model.parameters():
        param.requires_grad_(False)
    return Base(model=model, tokenizer=tokenizer, config=config, path=path,
                fingerprint=fingerprint(path, config.revision), device=device, dtype=dtype,
                quantization=quantization, attn_implementation=attention,
                activation_checkpointing=checkpointing, template_source=template_source)


def bnb_config(quantization: str, compute_dtype, device: str = "cuda"):
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # On GPUs the storage dtype equals the compute dtype, so FSDP can shard the packed 4-bit weights with the
    # rest. On CPU it stays uint8: bitsandbytes' CPU kernels repack uint8 weights at the first forward and
    # can only unpack those again (saving or copying a module's state afterwards asserts otherwise).
    storage = compute_dtype if not device.startswith("cpu") else torch.uint8
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=storage)


def check_model_files(config: ModelConfig) -> tuple[str, bool]:
    """(local directory or Hub id, load safetensors only) for ``config.name``, checked without loading it.

    A local path must be a directory with safetensors weights whose headers read whole (a truncated or
    damaged file is found here, before anything loads); a pickle-only checkpoint is refused unless
    allowed. A name that is no local path and cannot be a Hub id is a missing directory, said so.
    """
    path = resolve_model_path(config.name)
    local = Path(path).expanduser()
    if not local.exists():
        if _is_hub_id(path):
            return path, not config.allow_pickle_weights
        guess = closest(local.name, [p.name for p in local.parent.iterdir()]) if local.parent.is_dir() else None
        raise LorelayError("no such model directory", file=path, field="model.name",
                           hint=f"did you mean '{local.parent / guess}'?" if guess else
                           "give a directory with config.json and *.safetensors, or a Hub id such as "
                           "HuggingFaceTB/SmolLM2-135M-Instruct")
    if not local.is_dir():
        raise LorelayError("expected a model directory", file=local, field="model.name")
    weights = sorted(local.glob("*.safetensors"))
    has_pickle = any(local.glob("*.bin")) or any(local.glob("*.pt")) or any(local.glob("*.pth"))
    if not weights and has_pickle and not config.allow_pickle_weights:
        raise LorelayError("this checkpoint has only pickle weights (.bin/.pt), which can run code when loaded",
                           file=local, field="model.name",
                           hint="convert it to safetensors, or set model.allow_pickle_weights: true if you trust it")
    if not weights and not has_pickle:
        raise LorelayError("no weight files (*.safetensors) in this directory", file=local, field="model.name")
    for file in weights:
        check_safetensors_file(file, field="model.name")
    return str(local), not (config.allow_pickle_weights and not weights)


def check_safetensors_file(file: Path, *, field: str | None = None) -> None:
    """Read a safetensors header: a truncated or damaged file fails here, in milliseconds."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise LorelayError(f"unreadable weights ({first_line(err)})", file=file, field=field,
                           hint="the file is damaged or incomplete: copy, download or convert it again") from None


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def fingerprint(path: str, revision: str | None = None) -> str:
    """A short content hash of a local checkpoint's weights, or the Hub id and revision."""
    local = Path(path)
    if not local.is_dir():
        return f"{path}@{revision or 'main'}"
    digest = hashlib.sha256()
    for file in sorted(local.glob("*.safetensors")) + sorted(local.glob("config.json")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}".encode())
        with open(file, "rb") as handle:
            # Head and tail of each file: cheap for multi-GB shards, and any re-save changes them.
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, stat.st_size - (1 << 20)))
            digest.update(handle.read())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# adapters
# ----------------------------------------------------------------------------------------------

TaskType = Literal["causal", "seq_cls"]


def lora_config(lora: LoraSettings, task: TaskType = "causal", *, extra_modules_to_save: list[str] = ()):
    from peft import LoraConfig, TaskType as PeftTask

    modules_to_save = list(dict.fromkeys([*lora.modules_to_save, *extra_modules_to_save])) or None
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, modules_to_save=modules_to_save,
                      use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias="none",
                      task_type=PeftTask.SEQ_CLS if task == "seq_cls" else PeftTask.CAUSAL_LM)


def settings_from_adapter(adapter_dir: str | Path) -> LoraSettings:
    """The LoRA shape of a saved adapter, so a stage continuing it builds the same layers."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.exists():
        raise LorelayError("not an adapter directory (no adapter_config.json)", file=adapter_dir)
    saved = json.loads(config_path.read_text())
    targets = saved.get("target_modules") or "all-linear"
    return LoraSettings(r=saved["r"], alpha=int(saved["lora_alpha"]), dropout=saved.get("lora_dropout", 0.0),
                        target_modules=sorted(targets) if isinstance(targets, list) else targets,
                        modules_to_save=list(saved.get("modules_to_save") or []),
                        use_rslora=bool(saved.get("use_rslora")), use_dora=bool(saved.get("use_dora")))


def attach_adapter(model, lora: LoraSettings, *, init_from: str | Path | None = None,
                   task: TaskType = "causal", adapter_name: str = "default",
                   extra_modules_to_save: list[str] = (), allow_pickle_weights: bool = False):
    """Wrap ``model`` in a trainable LoRA adapter, optionally starting from a saved adapter's weights.

    Starting from a saved adapter keeps that adapter's shape (its r, alpha and targets win over
    ``lora``), so an SFT adapter continues into DPO or becomes the reward model's backbone adapter.
    A saved adapter must hold safetensors weights (a pickle ``adapter_model.bin`` is refused unless
    ``allow_pickle_weights``); when it is a lorelay stage (``manifest.json``), its files are checked
    against the manifest's checksums first.
    """
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if init_from is not None:
        _check_adapter_files(Path(init_from), allow_pickle_weights)
        lora = settings_from_adapter(init_from)
    own_forward = vars(model).get("forward")  # restored by detach_adapter: trainers patch it in place
    peft_model = get_peft_model(model, lora_config(lora, task, extra_modules_to_save=extra_modules_to_save),
                                adapter_name=adapter_name)
    peft_model.lorelay_base_forward = own_forward
    if init_from is not None:
        weights = load_peft_weights(str(init_from), device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
        missing_lora = [k for k in result.missing_keys if "lora_" in k]
        if missing_lora:
            raise LorelayError(f"adapter does not fit this base model ({len(missing_lora)} LoRA weights missing, "
                               f"e.g. {missing_lora[0]})", file=init_from)
    return peft_model


def _check_adapter_files(directory: Path, allow_pickle_weights: bool) -> None:
    if (directory / "manifest.json").is_file():
        from stages.core.training import verify_output

        verify_output(directory)
    if (directory / "adapter_model.safetensors").is_file():
        return
    pickled = [p.name for p in directory.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth")]
    if pickled and not allow_pickle_weights:
        raise LorelayError(f"this adapter has only pickle weights ({pickled[0]}), which can run code when loaded",
                           file=directory, hint="re-save it as safetensors, or set "
                                                "model.allow_pickle_weights: true if you trust it")
    if not pickled and (directory / "adapter_config.json").is_file():
        raise LorelayError("no adapter weights (adapter_model.safetensors) in this adapter directory", file=directory)


def detach_adapter(peft_model):
    """Remove every LoRA layer and return the bare base model, unchanged by the stage.

    PEFT's unload swaps each ``modules_to_save`` module for its trained copy; on the shared base
    (``lora.modules_to_save: [embed_tokens]``) that would change the model for every later stage,
    so the original modules go back first. TRL also patches the base's ``forward`` in place (its fused
    LM head), once per trainer; the base gets back the ``forward`` it had when the adapter was attached.
    """
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(peft_model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, attr = name.rpartition(".")
            setattr(peft_model.get_submodule(parent_name), attr, module.original_module)
    own_forward = getattr(peft_model, "lorelay_base_forward", None)
    base = peft_model.unload()
    vars(base).pop("forward", None)
    if own_forward is not None:
        base.forward = own_forward
    return base


def parameter_storage(model) -> set[int]:
    """Distinct storage addresses of every parameter and buffer: equal sets mean shared weights."""
    pointers = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        pointers.add(tensor.untyped_storage().data_ptr())
    return pointers
