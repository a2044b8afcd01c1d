"""The settings every stage shares and the TRL arguments built from them.

- ``TrainingConfig``: the optimisation settings common to all stages.
- ``trainer_args``: a TRL config from it with defaults that are right on both CPU and GPU (TRL
  defaults to bf16 and activation checkpointing, which fail or crawl on CPU).
- ``callbacks`` / ``quiet_trainer``: the callbacks every stage's trainer gets.
- process helpers (``world_size``, ``is_main_process``, ``barrier``) and ``seed_everything``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

from stages.core.config import field
from stages.core.errors import ConfigError, did_you_mean

Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr",
                    "warmup_stable_decay"]
# torch.compile backends that both torch and accelerate's TorchDynamoPlugin (which transformers' Trainer uses) take.
CompileBackend = Literal["inductor", "aot_eager", "eager"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# What training.compile: null (auto) does per device: on only where it measured faster. On CPU a compiled
# SmolLM2-135M SFT step was 1.32x faster, but compiling took 3.7-7.5 minutes, repaid only after ~125-260 steps
# (docs/benchmarks.md, "training.compile on CPU"); on CUDA it is not measured yet, so it stays off there too.
COMPILE_AUTO = {"cpu": False, "cuda": False}


@dataclasses.dataclass
class TrainingConfig:
    output_dir: Path | None = field(None, help="Where the finished stage is written (atomically); default outputs/<stage>.")
    seed: int = field(42, help="Seed for data order, dropout and LoRA initialisation.")
    epochs: float = field(1.0, help="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = field(-1, help="Optimizer steps to run; -1 means use epochs.")
    batch_size: int = field(8, help="Samples per device per micro-batch.")
    gradient_accumulation_steps: int = field(
        1, help="Micro-batches per optimizer step. Global batch = batch_size x accumulation x processes.")
    learning_rate: float = field(2e-4, help="Peak learning rate (LoRA takes ~10x a full fine-tune's).")
    lr_scheduler: Scheduler = field("cosine", help="Learning-rate schedule after warmup.")
    warmup_ratio: float = field(0.05, help="Fraction of steps spent warming up linearly from 0.")
    min_lr_ratio: float = field(0.1, help="Floor of cosine_with_min_lr / warmup_stable_decay, as a fraction of the peak.")
    decay_ratio: float = field(0.1, help="warmup_stable_decay: share of the steps spent in the final decay.")
    weight_decay: float = field(0.0, help="AdamW weight decay.")
    max_grad_norm: float = field(1.0, help="Gradient clipping norm.")
    optimizer: str = field("auto", help="transformers optimizer name; auto: adamw_torch_fused on CUDA, adamw_torch on CPU.")
    logging_steps: int = field(5, help="Log loss and learning rate every N steps.")
    eval_steps: int | None = field(None, help="Evaluate every N steps; None evaluates once at the end.")
    save_steps: int | None = field(None, help="Checkpoint every N steps (for --resume); None saves only the result.")
    save_total_limit: int = field(2, help="Checkpoints kept on disk.")
    early_stopping_patience: int | None = field(None, help="Stop after N evaluations without eval-loss improvement.")
    report_to: list[str] = field(default_factory=list, help="Trackers: tensorboard, wandb (used when installed).")
    resume: bool = field(False, help="Continue from the last checkpoint in <output_dir>.partial (--resume).")
    restart: bool = field(False, help="Discard the checkpoints an interrupted earlier run left and start over (--restart).")
    use_liger_kernel: bool = field(
        False, help="Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) in the model (TRL/transformers' "
                    "use_liger_kernel). CUDA only; needs `pip install liger-kernel`. The LM head and loss stay "
                    "lorelay's (reply tokens only) where those apply.")
    compile: bool | None = field(
        None, help="torch.compile the model for training (transformers' torch_compile: accelerate compiles it "
                   "when the trainer prepares it; the first steps include compilation). null: auto, on only "
                   "where it measured faster (off on CPU; off on CUDA until measured: docs/benchmarks.md). "
                   "Packed preference rows (DPO, ORPO, KTO, RM) refuse it: they call the decoder themselves.")
    compile_backend: CompileBackend = field(
        "inductor", help="torch.compile backend when training.compile is on: inductor generates fused kernels "
                         "(C++ on CPU, Triton on CUDA); aot_eager and eager only trace (checks that the model "
                         "compiles, no speed-up).")
    compile_mode: CompileMode = field(
        "default", help="torch.compile mode: reduce-overhead adds CUDA graphs (CUDA only), max-autotune "
                        "searches kernel configurations (slower compilation).")
    trl_args: dict[str, Any] = field(
        default_factory=dict, help="Any other argument of the stage's TRL config (SFTConfig, DPOConfig, ...; "
                                   "e.g. {neftune_noise_alpha: 5}), checked against that class's fields. Keys "
                                   "lorelay sets itself are refused with the setting to use instead.")
    on_nonfinite: Literal["stop", "skip"] = field(
        "stop", help="A NaN/inf loss or gradient: stop, keeping the last good checkpoint, or skip that step "
                     "(counted in metrics.json; 6 bad steps in a row still stop).")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("must be at least 1", field="batch_size")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("must be at least 1", field="gradient_accumulation_steps")
        if self.learning_rate <= 0:
            raise ConfigError("must be positive", field="learning_rate")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="warmup_ratio")
        if not 0.0 <= self.decay_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="decay_ratio")
        if self.resume and self.restart:
            raise ConfigError("resume and restart exclude each other", field="restart",
                              hint="--resume continues the interrupted run, --restart discards it")
        if self.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("liger-kernel is not installed", field="use_liger_kernel",
                              hint="pip install liger-kernel (CUDA), or set use_liger_kernel: false")
        if self.compile is False and (self.compile_backend != "inductor" or self.compile_mode != "default"):
            raise ConfigError("a compile backend or mode is set, but training.compile is false", field="compile",
                              hint="set training.compile: true (or null), or remove compile_backend/compile_mode")
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ConfigError("early stopping needs periodic evaluation", field="early_stopping_patience",
                              hint="set training.eval_steps")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (issue 7). A no-op in a single process; under ``accelerate launch`` it
    joins (and if needed starts) accelerate's process group, the same one the trainers use."""
    if world_size() <= 1:
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def effective_batch(training) -> dict[str, Any]:
    """What one optimizer step really sees across all processes (recorded in every manifest)."""
    processes = world_size()
    per_device = int(training.batch_size)
    accumulation = int(training.gradient_accumulation_steps)
    return {"world_size": processes, "per_device_batch_size": per_device,
            "gradient_accumulation_steps": accumulation,
            "global_batch_size": per_device * accumulation * processes,
            "learning_rate": training.learning_rate, "distributed": distributed_type()}


def distributed_type() -> str:
    """How accelerate really runs this process group: FSDP, DEEPSPEED, MULTI_GPU, MULTI_CPU or NO."""
    from accelerate.state import AcceleratorState, is_initialized

    return AcceleratorState().distributed_type.value if is_initialized() else "NO"


def say_if_not_sharded() -> None:
    """Say once when an FSDP launch config runs unsharded.

    accelerate honours ``distributed_type: FSDP`` on accelerators only; on CPU it silently runs the same
    launch as plain data parallel (``MULTI_CPU``): the result equals FSDP's, the memory is not sharded.
    """
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    actual = distributed_type()
    if requested and actual != "FSDP":
        say(f"the launch config asks for FSDP, but accelerate runs it as {actual}: it shards only on GPUs and "
            "other accelerators. Training is the same; parameters are not sharded.")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): call it before attaching a fresh adapter, so the
    LoRA initialisation, like data order and dropout (seeded by the trainer), follows training.seed."""
    from transformers import set_seed

    set_seed(seed)


def trainer_args(config_class, training: TrainingConfig, base, work_dir: Path, *, has_eval: bool,
                 **stage_args):
    """A TRL config (SFTConfig, DPOConfig, ...) from lorelay's settings for this base and device."""
    import torch

    on_cuda = base.device.startswith("cuda")
    if training.use_liger_kernel and not on_cuda:
        raise ConfigError("Liger's kernels are Triton kernels and need a CUDA GPU", field="training.use_liger_kernel",
                          hint="set training.use_liger_kernel: false on this machine")
    compile_model = compile_decision(training, on_cuda)
    bf16 = base.dtype == torch.bfloat16
    fp16 = base.dtype == torch.float16
    optimizer = training.optimizer
    if optimizer == "auto":
        optimizer = "adamw_torch_fused" if on_cuda else "adamw_torch"
    scheduler_kwargs = {}
    if training.lr_scheduler == "cosine_with_min_lr":
        scheduler_kwargs = {"min_lr_rate": training.min_lr_ratio}
    elif training.lr_scheduler == "warmup_stable_decay":
        scheduler_kwargs = {"num_decay_steps": 0, "min_lr_ratio": training.min_lr_ratio}  # fit() sets the steps
    eval_strategy = "no" if not has_eval else ("steps" if training.eval_steps else "no")
    save_strategy = "steps" if training.save_steps else "no"
    early_stop = training.early_stopping_patience is not None and has_eval
    args = dict(
        output_dir=str(work_dir / "checkpoints"),
        seed=training.seed,
        data_seed=training.seed,
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=training.warmup_ratio,  # a float < 1 is read as a ratio of total steps
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=optimizer,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=training.eval_steps,
        save_strategy="steps" if early_stop else save_strategy,
        save_steps=training.save_steps or training.eval_steps,
        save_total_limit=training.save_total_limit,
        save_only_model=False,
        load_best_model_at_end=early_stop,
        metric_for_best_model="eval_loss" if early_stop else None,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not on_cuda,
        activation_checkpointing=base.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if base.activation_checkpointing else None,
        report_to=available_trackers(training.report_to),
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        use_liger_kernel=training.use_liger_kernel,
        torch_compile=compile_model,
        # transformers turns torch_compile on whenever a backend or mode is given: only pass them with it
        torch_compile_backend=training.compile_backend if compile_model else None,
        torch_compile_mode=training.compile_mode if compile_model and training.compile_mode != "default" else None,
    )
    check_trl_args(training.trl_args, config_class, stage_keys=stage_args)
    args.update(stage_args)
    args.update(training.trl_args)
    return config_class(**args)


def compile_decision(training: TrainingConfig, on_cuda: bool) -> bool:
    """Whether the trainer compiles the model: training.compile, or where it is null the measured default for
    this device. Refuses, naming training.compile, what cannot compile here; says once what runs."""
    device = "cuda" if on_cuda else "cpu"
    compile_model = COMPILE_AUTO[device] if training.compile is None else training.compile
    if not compile_model:
        if training.compile is None:
            say_once(f"training.compile is auto: off on {device.upper()} (on only where it measured faster; "
                     "docs/benchmarks.md). Set training.compile: true to compile the model.")
        return False
    problem = compile_problem(training, on_cuda)
    if problem is not None:
        reason, hint = problem
        raise ConfigError(reason, field="training.compile", hint=hint)
    # Compile for dynamic shapes from the first step (accelerate's dynamo_use_dynamic, unless the launch config
    # sets it): lorelay's batches are padding-free, so every step has a new length and the static graph
    # compiled for the first one would be recompiled at the second (a third of the compile time, tiny model).
    os.environ.setdefault("ACCELERATE_DYNAMO_USE_DYNAMIC", "true")
    mode = "" if training.compile_mode == "default" else f", mode {training.compile_mode}"
    say_once(f"training.compile: torch.compile with backend {training.compile_backend}{mode}; "
             "the first steps (and each new sequence-length shape) include compilation")
    return True


def compile_problem(training: TrainingConfig, on_cuda: bool) -> tuple[str, str] | None:
    """Why torch.compile cannot run with these settings on this machine (reason, hint), or None."""
    if training.compile_mode == "reduce-overhead" and not on_cuda:
        return ("compile_mode reduce-overhead is CUDA graphs, which need a CUDA GPU",
                "set training.compile_mode: default on this machine")
    if training.compile_backend != "inductor":
        return None
    if on_cuda and importlib.util.find_spec("triton") is None:
        return ("the inductor backend generates Triton kernels on CUDA, and triton is not installed",
                "pip install triton, or set training.compile_backend: aot_eager, or training.compile: false")
    if not on_cuda and not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        return ("the inductor backend compiles C++ kernels on CPU, and no C++ compiler (g++, clang++ or $CXX) "
                "is on the PATH", "install g++, or set training.compile: false")
    return None


@functools.cache
def say_once(message: str) -> None:
    """``say`` a message once per process (every stage of a pipeline would repeat it)."""
    say(message)


# TRL arguments lorelay derives from its own settings (trainer_args), and where a user sets them instead.
MANAGED_TRL_ARGS = {
    "output_dir": "training.output_dir", "seed": "training.seed", "data_seed": "training.seed",
    "num_train_epochs": "training.epochs", "max_steps": "training.max_steps",
    "per_device_train_batch_size": "training.batch_size", "per_device_eval_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "learning_rate": "training.learning_rate", "lr_scheduler_type": "training.lr_scheduler",
    "lr_scheduler_kwargs": "training.min_lr_ratio and training.decay_ratio", "warmup_steps": "training.warmup_ratio",
    "warmup_ratio": "training.warmup_ratio", "weight_decay": "training.weight_decay",
    "max_grad_norm": "training.max_grad_norm", "optim": "training.optimizer", "logging_steps": "training.logging_steps",
    "eval_strategy": "training.eval_steps", "eval_steps": "training.eval_steps", "save_strategy": "training.save_steps",
    "save_steps": "training.save_steps", "save_total_limit": "training.save_total_limit",
    "load_best_model_at_end": "training.early_stopping_patience",
    "metric_for_best_model": "training.early_stopping_patience", "report_to": "training.report_to",
    "resume_from_checkpoint": "training.resume", "bf16": "model.dtype", "fp16": "model.dtype",
    "use_cpu": "the device (CUDA when available)", "activation_checkpointing": "model.activation_checkpointing",
    "gradient_checkpointing": "model.activation_checkpointing", "use_liger_kernel": "training.use_liger_kernel",
    "torch_compile": "training.compile", "torch_compile_backend": "training.compile_backend",
    "torch_compile_mode": "training.compile_mode",
    # lorelay's checkpoints and data depend on these:
    "save_only_model": "nothing: resume needs the optimizer state", "remove_unused_columns": "nothing: lorelay's "
    "datasets hold exactly the columns the trainer needs",
}


def check_trl_args(trl_args: dict[str, Any], config_class: type | str, *, stage_keys=()) -> None:
    """Refuse a ``training.trl_args`` key that ``config_class`` (a TRL config, or ``"module:Name"``) has no
    field for, naming the closest one, and keys that lorelay or the stage (``stage_keys``) set themselves.
    Stage configs call it when they are built, so that the error names the config file's line."""
    if not trl_args:
        return
    if isinstance(config_class, str):
        module, _, name = config_class.partition(":")
        config_class = getattr(importlib.import_module(module), name)
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    for key in trl_args:
        where = f"training.trl_args.{key}"
        if key in MANAGED_TRL_ARGS:
            raise ConfigError(f"lorelay sets {key} itself", field=where, hint=f"set {MANAGED_TRL_ARGS[key]}")
        if key in stage_keys:
            raise ConfigError(f"the stage sets {key} from its own settings", field=where,
                              hint="use the stage's key for it (lorelay NAME --help-config)")
        if key not in fields:
            raise ConfigError(f"{config_class.__name__} has no argument '{key}'", field=where,
                              hint=did_you_mean(key, fields) or f"see the {config_class.__name__} documentation")


def available_trackers(requested: list[str]) -> list[str]:
    """The requested trackers that are installed; a missing one is reported, not fatal."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
    usable = []
    for name in requested:
        if name not in modules:
            raise ConfigError(f"unknown tracker '{name}'", field="training.report_to",
                              hint=f"choose from {', '.join(modules)}")
        if importlib.util.find_spec(modules[name]) is not None:
            usable.append(name)
        else:
            print(f"lorelay: report_to '{name}' is not installed; skipping it (pip install {name})")
    return usable


def callbacks(training: TrainingConfig, *, has_eval: bool, title: str) -> list:
    from transformers import EarlyStoppingCallback

    from stages.core.training.trainer_callbacks import NonFiniteGuard, RichProgress

    result = [RichProgress(title), NonFiniteGuard(training.on_nonfinite)]
    if training.early_stopping_patience is not None and has_eval:
        result.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    return result


def quiet_trainer(trainer):
    """Drop transformers' print-every-log callback: the rich progress line shows the same numbers."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer



def say(message: str) -> None:
    """A one-line note on stderr, from the main process only."""
    if is_main_process():
        print(f"lorelay: {message}", file=sys.stderr, flush=True)
