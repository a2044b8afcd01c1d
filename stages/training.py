"""What every stage shares around its TRL trainer.

- ``TrainingConfig``: the optimisation settings common to all stages.
- ``trainer_args``: builds a TRL config from it with defaults that are right on both CPU and GPU
  (TRL defaults to bf16 and activation checkpointing, which fail or crawl on CPU).
- ``StageOutput``: the atomic output directory. Work happens in ``<output_dir>.partial/``; the
  finished directory appears by one rename, so an interrupted run never leaves a stage that looks
  finished. ``manifest.json`` records the resolved config, versions, hashes and file checksums.
- Callbacks: rich progress, a non-finite loss guard, and the log history kept for ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from stages import __version__
from stages.config import field, to_dict
from stages.errors import ConfigError, LorelayError

Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr",
                    "warmup_stable_decay"]


@dataclasses.dataclass
class TrainingConfig:
    output_dir: Path = field(Path("outputs/stage"), help="Where the finished stage is written (atomically).")
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
    weight_decay: float = field(0.0, help="AdamW weight decay.")
    max_grad_norm: float = field(1.0, help="Gradient clipping norm.")
    optimizer: str = field("auto", help="transformers optimizer name; auto: adamw_torch_fused on CUDA, adamw_torch on CPU.")
    logging_steps: int = field(5, help="Log loss and learning rate every N steps.")
    eval_steps: int | None = field(None, help="Evaluate every N steps; None evaluates once at the end.")
    save_steps: int | None = field(None, help="Checkpoint every N steps (for --resume); None saves only the result.")
    save_total_limit: int = field(2, help="Checkpoints kept on disk.")
    early_stopping_patience: int | None = field(None, help="Stop after N evaluations without eval-loss improvement.")
    report_to: list[str] = field(default_factory=list, help="Trackers: tensorboard, wandb (used when installed).")
    resume: bool = field(False, help="Continue from the last checkpoint in <output_dir>.partial.")
    on_nonfinite: Literal["stop", "skip"] = field(
        "stop", help="A NaN/inf loss: stop keeping the last good checkpoint, or skip that step.")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("must be at least 1", field="batch_size")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("must be at least 1", field="gradient_accumulation_steps")
        if self.learning_rate <= 0:
            raise ConfigError("must be positive", field="learning_rate")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="warmup_ratio")
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ConfigError("early stopping needs periodic evaluation", field="early_stopping_patience",
                              hint="set training.eval_steps")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def trainer_args(config_class, training: TrainingConfig, base, work_dir: Path, *, has_eval: bool,
                 **stage_args):
    """A TRL config (SFTConfig, DPOConfig, ...) from lorelay's settings for this base and device."""
    import torch

    on_cuda = base.device.startswith("cuda")
    bf16 = base.dtype == torch.bfloat16
    fp16 = base.dtype == torch.float16
    optimizer = training.optimizer
    if optimizer == "auto":
        optimizer = "adamw_torch_fused" if on_cuda else "adamw_torch"
    scheduler_kwargs = {}
    if training.lr_scheduler == "cosine_with_min_lr":
        scheduler_kwargs = {"min_lr_rate": training.min_lr_ratio}
    elif training.lr_scheduler == "warmup_stable_decay":
        scheduler_kwargs = {"num_decay_steps": 0, "min_lr_ratio": training.min_lr_ratio}
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
    )
    args.update(stage_args)
    return config_class(**args)


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

    from stages.progress import NonFiniteGuard, RichProgress

    result = [RichProgress(title), NonFiniteGuard(training.on_nonfinite)]
    if training.early_stopping_patience is not None and has_eval:
        result.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    return result


def quiet_trainer(trainer):
    """Drop transformers' print-every-log callback: the rich progress line shows the same numbers."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def fit(trainer, output: "StageOutput", training: TrainingConfig):
    """Run ``trainer.train`` for a stage: resume from the last checkpoint when asked.

    Every stage trains through here, so resuming, interruption handling and the numerical guard
    behave the same in all of them.
    """
    started = time.time()
    resume_from = last_checkpoint(output.work_dir) if training.resume else None
    result = trainer.train(resume_from_checkpoint=resume_from)
    output.mark("train", started)
    return result


def last_checkpoint(work_dir: Path) -> str | None:
    """The newest complete checkpoint under ``work_dir/checkpoints``, for resuming."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = work_dir / "checkpoints"
    if not folder.is_dir():
        return None
    return get_last_checkpoint(str(folder))


# ----------------------------------------------------------------------------------------------
# the output directory
# ----------------------------------------------------------------------------------------------

def package_versions() -> dict[str, str]:
    versions = {"lorelay": __version__}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the lorelay checkout that ran this, when it is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_of(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def verify_output(directory: str | Path) -> dict[str, Any]:
    """Load a finished stage's manifest and check every file against its recorded checksum."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.exists():
        raise LorelayError("not a finished lorelay stage (no manifest.json)", file=directory)
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise LorelayError(f"manifest.json is not valid JSON ({err.msg})", file=manifest_path, line=err.lineno) from None
    for name, expected in manifest.get("files", {}).items():
        file = directory / name
        if not file.exists():
            raise LorelayError(f"file listed in manifest.json is missing: {name}", file=directory)
        if sha256_of(file) != expected:
            raise LorelayError(f"checksum mismatch for {name}: the file changed after the stage finished",
                               file=file)
    return manifest


class StageOutput:
    """An output directory that appears complete or not at all.

    ``work_dir`` (``<output_dir>.partial``) holds checkpoints while training; ``staging`` is where
    the result is assembled. ``commit`` writes the manifest, then renames ``staging`` onto
    ``output_dir`` (moving any earlier result aside first, and deleting it only afterwards).
    """

    def __init__(self, output_dir: str | Path, *, stage: str, resume: bool = False):
        self.output_dir = Path(output_dir)
        self.stage = stage
        self.work_dir = self.output_dir.with_name(self.output_dir.name + ".partial")
        self.staging = self.work_dir / "result"
        self.started = time.time()
        self.timings: dict[str, float] = {}
        if self.work_dir.exists() and not resume:
            shutil.rmtree(self.work_dir)
        if self.staging.exists():
            shutil.rmtree(self.staging)  # a half-assembled result from a crash is never reused
        self.staging.mkdir(parents=True, exist_ok=True)
        check_free_disk(self.work_dir)

    def mark(self, phase: str, since: float) -> None:
        self.timings[phase] = round(time.time() - since, 3)

    def write_json(self, name: str, data: Any) -> Path:
        path = self.staging / name
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return path

    def commit(self, *, config: Any, base, data_hashes: dict[str, str] | None = None,
               metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
        self.timings["total"] = round(time.time() - self.started, 3)
        manifest = {
            "stage": self.stage,
            "lorelay_version": __version__,
            "config": to_dict(config),
            "base_model": {"name": base.config.name, "path": base.path, "fingerprint": base.fingerprint,
                           "quantization": base.quantization, "dtype": str(base.dtype).replace("torch.", ""),
                           "attn_implementation": base.attn_implementation,
                           "chat_template": base.template_source},
            "data": data_hashes or {},
            "metrics": metrics or {},
            "versions": package_versions(),
            "git_commit": git_commit(),
            "timings": self.timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        manifest["files"] = file_checksums(self.staging)
        self.write_json("manifest.json", manifest)
        previous = self.output_dir.with_name(self.output_dir.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        if self.output_dir.exists():
            os.replace(self.output_dir, previous)
        os.replace(self.staging, self.output_dir)
        shutil.rmtree(previous, ignore_errors=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return self.output_dir


def check_free_disk(path: Path, needed_bytes: int = 512 << 20) -> None:
    """Refuse to start writing checkpoints onto a nearly full disk."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise LorelayError(f"only {free >> 20} MiB free, {needed_bytes >> 20} MiB needed for checkpoints",
                           file=probe)


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return float(math.exp(min(loss, 50.0)))


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
