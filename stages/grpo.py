"""GRPO: online reinforcement learning from rewards, on a LoRA adapter over the shared base (TRL's GRPOTrainer).

For each prompt the policy samples ``num_generations`` replies; every reward scores them; each reply's
advantage is its weighted reward sum measured against its own group's; the policy moves toward the better
replies of each group, clipped like PPO.

This recipe supports:
- rewards from ``stages.core.rewards`` (built-in checks, ``module:function``, ``path/file.py:function``), each
  with a weight, mixed freely with a trained reward model (``reward_model``: an ``rm`` stage directory). The
  reward model scores on the *same* base as a second, frozen adapter beside the policy's
  (``stages.core.reward_adapter``): one base in memory;
- continuing an incoming adapter (e.g. SFT); with ``beta > 0`` the KL reference is a frozen copy of it (TRL's
  ``ref`` adapter on the same base); ``beta: 0`` (the default) trains without a reference;
- TRL's loss variants (``loss_type``: dapo, grpo, dr_grpo) and GSPO (``importance_sampling_level: sequence``);
- generation with transformers (CPU, and CUDA without vLLM), or vLLM in colocate mode on CUDA when the ``vllm``
  extra is installed (``generation: auto``); metrics.json says which ran.

Assumptions: the base is shared with other stages and comes back bare; prompts are conversations
(``stages.core.prompts``) and the rewards read the data's other columns.

Raises: ``ConfigError`` before the model is touched for bad reward specs, sizes that do not divide, or a reward
that fails on a trial call with real data rows; ``DataError`` naming file:line for a malformed prompt row.

Output directory: the policy adapter (never ``ref`` or ``reward``), tokenizer, metrics.json (reward per function
over the steps, completion lengths, clipped ratios, KL when beta > 0; scores and pass rates of greedy replies to
held-out prompts before and after), samples.json (those replies), manifest.json.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from pathlib import Path
from typing import Any, Literal

from stages.core import compat
from stages.core.config import field
from stages.core.data import DatasetSpec
from stages.core.errors import ConfigError
from stages.core.evaluation import generate
from stages.core.lifecycle import borrows_base
from stages.core.modeling import Base, LoraSettings, ModelConfig, attach_adapter, detach_adapter
from stages.core.prompts import PromptSet, load_prompts
from stages.core.rewards import RewardSpec, check_rewards, load_rewards, pass_rates
from stages.core.stage import Metric, Stage
from stages.core.training import (StageOutput, TrainingConfig, callbacks, check_trl_args, fit, is_main_process,
                                  quiet_trainer, seed_everything, trainable_parameters, trainer_args,
                                  world_size)
from stages.core.reward_adapter import RewardModelReward

# TRL's logged metric -> our name in train_history (rewards/<name>/mean are added per reward).
HISTORY = {"loss": "loss", "reward": "reward", "reward_std": "reward_std",
           "completions/mean_length": "completion_length", "completions/clipped_ratio": "truncated_ratio",
           "clip_ratio/region_mean": "clipped_ratio", "kl": "kl", "entropy": "entropy",
           "frac_reward_zero_std": "zero_std_groups"}


@dataclasses.dataclass
class PromptData:
    datasets: list[DatasetSpec] = field(
        default_factory=list, help="Prompt datasets: `prompt` or `messages` rows, plus the columns the rewards "
                                   "read (answer, sign_off, ...). Mixed by weight or sample count.")
    eval_prompts: int = field(
        16, help="Prompts held out of training; the policy's greedy replies to them before and after training "
                 "are scored by every reward (metrics.json, samples.json). 0: none.")

    def __post_init__(self):
        if self.eval_prompts < 0:
            raise ConfigError("must be 0 or more", field="eval_prompts")


@dataclasses.dataclass
class GRPOTraining(TrainingConfig):
    # Defaults that differ from TrainingConfig: RL from a trained adapter takes small, frequently logged steps.
    output_dir: Path = field(Path("outputs/grpo"), help="Where the finished stage is written (atomically).")
    batch_size: int = field(
        8, help="Completions per device per micro-batch. batch_size x accumulation x processes completions make "
                "one optimizer step and must be a multiple of num_generations (whole groups).")
    gradient_accumulation_steps: int = field(1, help="Micro-batches per optimizer step (and per generation round).")
    learning_rate: float = field(2e-5, help="Peak learning rate for the LoRA adapter.")
    warmup_ratio: float = field(0.0, help="Fraction of steps spent warming up linearly from 0.")
    logging_steps: int = field(1, help="Log rewards, lengths and loss every N steps.")


@dataclasses.dataclass
class GRPOConfig:
    model: ModelConfig = field(
        default_factory=ModelConfig, help="Base model (ignored inside a pipeline, which shares its base).")
    lora: LoraSettings = field(
        default_factory=LoraSettings, help="Adapter shape without an incoming adapter (an incoming one's shape wins).")
    data: PromptData = field(default_factory=PromptData, help="Prompt datasets and held-out prompts.")
    training: GRPOTraining = field(default_factory=GRPOTraining, help="Optimisation and output settings.")
    rewards: list[RewardSpec] = field(
        default_factory=list, help="Programmatic rewards: {fn, weight, name, args} each (stages/core/rewards.py).")
    reward_model: Path | None = field(
        None, help="An rm stage directory whose score is one more reward (on the same base, as a second adapter).")
    reward_model_weight: float = field(1.0, help="Weight of the reward model's score in the sum.")
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = field(
        "dapo", help="dapo: token-level mean over the batch (no length bias); grpo: per-sequence mean (favours "
                     "short right answers, long wrong ones); dr_grpo: sum / (batch x max_completion_length).")
    importance_sampling_level: Literal["token", "sequence"] = field(
        "token", help="token: GRPO's per-token ratios; sequence: one ratio per reply (GSPO).")
    num_generations: int = field(4, help="Replies sampled per prompt: the group each reply is compared with.")
    beta: float = field(
        0.0, help="KL penalty toward the reference (the frozen incoming adapter, or the base without one). "
                  "0: no reference, no KL (saves its forward pass).")
    epsilon: float = field(0.2, help="Clipping range of the policy ratio.")
    epsilon_high: float | None = field(None, help="Upper clipping bound (DAPO's clip-higher uses 0.28); None: epsilon.")
    scale_rewards: Literal["group", "batch", "none"] = field(
        "group", help="Divide advantages by the group's reward std (group), the batch's (batch), or not (none).")
    num_iterations: int = field(1, help="Optimisation passes over each batch of generations (mu).")
    max_completion_length: int = field(64, help="Longest sampled reply in tokens (longer ones are cut and counted).")
    mask_truncated_completions: bool = field(False, help="Leave cut-off replies out of the loss.")
    temperature: float = field(1.0, help="Sampling temperature of the replies.")
    top_p: float = field(1.0, help="Nucleus sampling mass.")
    generation: Literal["auto", "transformers", "vllm"] = field(
        "auto", help="Who samples: auto = vLLM (colocated, on the training GPU) when on CUDA with the vllm extra "
                     "installed, else transformers.")
    vllm_gpu_memory_utilization: float = field(0.3, help="vLLM's share of GPU memory in colocate mode.")
    generation_batch_size: int = field(16, help="Prompts per batch when generating the held-out replies.")

    def __post_init__(self):
        check_trl_args(self.training.trl_args, "trl:GRPOConfig")
        if not self.data.datasets:
            raise ConfigError("at least one prompt dataset is needed", field="data.datasets")
        if not self.rewards and self.reward_model is None:
            raise ConfigError("GRPO needs a reward: list `rewards`, set `reward_model`, or both", field="rewards")
        if self.num_generations < 2:
            raise ConfigError("at least 2: advantages compare the replies of one prompt", field="num_generations")
        per_step = self.training.batch_size * self.training.gradient_accumulation_steps * world_size()
        if per_step % self.num_generations:
            raise ConfigError(
                f"an optimizer step takes batch_size x gradient_accumulation_steps x processes = "
                f"{self.training.batch_size} x {self.training.gradient_accumulation_steps} x {world_size()} = "
                f"{per_step} completions, not a multiple of num_generations ({self.num_generations}): the groups "
                "would be split", field="training.batch_size",
                hint=f"e.g. batch_size: {self._divisible_batch()}")
        for name in ("beta", "epsilon"):
            if getattr(self, name) < 0:
                raise ConfigError("must be zero or positive", field=name)
        if not math.isfinite(self.reward_model_weight):
            raise ConfigError("must be a finite number", field="reward_model_weight")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be > 0 and top_p in (0, 1]", field="temperature")
        for name in ("max_completion_length", "num_iterations", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)

    def _divisible_batch(self) -> int:
        batch = self.training.batch_size
        while (batch * self.training.gradient_accumulation_steps * world_size()) % self.num_generations:
            batch += 1
        return batch


@borrows_base
def run(config: GRPOConfig, base: Base, adapter: str | Path | None = None) -> Path:
    """Train a GRPO adapter on ``base`` from ``adapter`` (or a fresh one); return the output directory."""
    from datasets import Dataset
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    training = config.training
    output = StageOutput(training.output_dir, stage="grpo", resume=training.resume,
                         restart=training.restart)
    backend = generation_backend(config, base)

    # ---- data and rewards: everything checked before the model is touched --------------------------
    started = time.time()
    prompts = load_prompts(config.data.datasets, seed=training.seed, eval_count=config.data.eval_prompts)
    rewards = load_rewards(config.rewards, where="rewards")
    trial = prompts.train[:4]  # a stand-in reply, passed the way GRPOTrainer passes replies
    check_rewards(rewards, [r["prompt"] for r in trial], [[{"role": "assistant", "content": "ok"}]] * len(trial),
                  {**prompts.column_values(trial), "completion_ids": [base.tokenizer("ok")["input_ids"]] * len(trial)})
    train_dataset = Dataset.from_list(prompts.train)  # prompt + the columns each reward is passed
    output.mark("data", started)

    # ---- model: the policy adapter, and the reward model beside it on the same base ---------------
    seed_everything(training.seed)
    model = attach_adapter(base.model, config.lora, init_from=adapter,
                           allow_pickle_weights=base.config.allow_pickle_weights)
    try:
        if config.reward_model is not None:
            rewards.append(RewardModelReward(model, base.tokenizer, config.reward_model,
                                             weight=config.reward_model_weight,
                                             batch_size=config.generation_batch_size))
        before = _evaluate(config, model, base, prompts, rewards)

        # ---- train --------------------------------------------------------------------------------
        args = trainer_args(
            TRLGRPOConfig, training, base, output.work_dir, has_eval=False,
            num_generations=config.num_generations, max_completion_length=config.max_completion_length,
            loss_type=config.loss_type, importance_sampling_level=config.importance_sampling_level,
            beta=config.beta, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
            scale_rewards=config.scale_rewards, num_iterations=config.num_iterations,
            mask_truncated_completions=config.mask_truncated_completions,
            temperature=config.temperature, top_p=config.top_p,
            reward_weights=[r.weight for r in rewards],
            use_vllm=backend == "vllm", vllm_mode="colocate",
            vllm_gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            log_completions=False, disable_dropout=True)
        trainer = quiet_trainer(GRPOTrainer(
            model=model, reward_funcs=list(rewards), args=args, train_dataset=train_dataset,
            processing_class=base.tokenizer, callbacks=callbacks(training, has_eval=False, title="grpo")))
        reference = ("none (beta 0)" if config.beta == 0 else
                     "adapter copy 'ref' (the incoming adapter, frozen)" if compat.has_reference_adapter(model)
                     else "base (adapters disabled)")
        result = fit(trainer, output, training)

        # ---- evaluate: the held-out prompts again, and the logged rewards per step ---------------
        started = time.time()
        after = _evaluate(config, model, base, prompts, rewards)
        history = train_history(trainer.state.log_history, [r.name for r in rewards])
        metrics: dict[str, Any] = {
            "generation": backend, "reference": reference, "loss_type": config.loss_type,
            "importance_sampling_level": config.importance_sampling_level,
            "rewards": {r.name: {"fn": r.fn, "weight": r.weight} for r in rewards},
            "train_loss": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime"),
            "steps": trainer.state.global_step,
            "seconds_per_step": (result.metrics.get("train_runtime") or 0) / max(trainer.state.global_step, 1),
            **_first_and_last(history)}
        if before is not None:
            metrics.update({f"eval_before_{k}": v for k, v in before["summary"].items()})
            metrics.update({f"eval_{k}": v for k, v in after["summary"].items()})
        trainable, total = trainable_parameters(model)
        metrics.update(trainable_parameters=trainable, total_parameters=total,
                       data={"train_prompts": len(prompts.train), "eval_prompts": len(prompts.eval),
                             "columns": prompts.columns})
        output.mark("evaluate", started)

        # ---- save the policy adapter only ----------------------------------------------------------
        if is_main_process():
            model.save_pretrained(output.staging, safe_serialization=True, selected_adapters=["default"])
            base.tokenizer.save_pretrained(output.staging)
            output.write_json("metrics.json", {**metrics, "train_history": history,
                                               "log_history": trainer.state.log_history})
            output.write_json("samples.json", _samples(prompts, before, after))
            output.commit(config=config, base=base, data_hashes={**prompts.data_hashes, **_reward_files(config)},
                          metrics=metrics, extra={"init_from": str(adapter) if adapter else None,
                                                  "reward_model": str(config.reward_model or "") or None})
        trainer.accelerator.wait_for_everyone()
    finally:
        detach_adapter(model)  # removes the policy, ref and reward adapters; undoes TRL's forward patch
    return output.output_dir


def generation_backend(config: GRPOConfig, base: Base) -> str:
    """``vllm`` or ``transformers``, as configured and available; a request that cannot be met is refused."""
    on_cuda = base.device.startswith("cuda")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if config.generation == "vllm" and not (on_cuda and has_vllm):
        raise ConfigError("vLLM generation needs a CUDA device and the vllm extra (pip install 'lorelay[vllm]')",
                          field="generation", hint="use generation: auto or transformers")
    return "vllm" if config.generation != "transformers" and on_cuda and has_vllm else "transformers"


# ----------------------------------------------------------------------------------------------
# held-out evaluation and reports
# ----------------------------------------------------------------------------------------------

def _evaluate(config: GRPOConfig, model, base: Base, prompts: PromptSet, rewards) -> dict | None:
    """Greedy replies to the held-out prompts, each reward's mean over them and each check's pass rate."""
    if not prompts.eval or not is_main_process():
        return None
    conversations = [r["prompt"] for r in prompts.eval]
    replies = [r[0] for r in generate(model, base.tokenizer, conversations, max_new_tokens=config.max_completion_length,
                                      batch_size=config.generation_batch_size)]
    columns = {**prompts.column_values(prompts.eval),  # and the replies' tokens, as GRPOTrainer passes them
               "completion_ids": [base.tokenizer(reply, add_special_tokens=False)["input_ids"] for reply in replies]}
    scores = {r.name: r(conversations, replies, **columns) for r in rewards}
    summary: dict[str, float | None] = {}
    for name, values in scores.items():
        applicable = [v for v in values if v is not None]
        summary[f"reward_{name}"] = sum(applicable) / len(applicable) if applicable else None
    programmatic = [r for r in rewards if not isinstance(r, RewardModelReward)]
    summary.update({f"pass_rate_{k}": v for k, v in pass_rates(programmatic, conversations, replies, columns).items()})
    return {"replies": replies, "scores": scores, "summary": summary}


def _samples(prompts: PromptSet, before: dict | None, after: dict | None) -> list[dict]:
    if before is None or after is None:
        return []
    return [{"prompt": record["prompt"][-1]["content"], "source": record["source"],
             "before": before["replies"][i], "after": after["replies"][i],
             "scores_before": {k: v[i] for k, v in before["scores"].items()},
             "scores_after": {k: v[i] for k, v in after["scores"].items()}}
            for i, record in enumerate(prompts.eval)]


def train_history(log_history: list[dict], reward_names: list[str]) -> list[dict]:
    """Per logged step: the summed reward, each reward's mean, completion length, clipped ratios, KL, loss."""
    rows = []
    for entry in log_history:
        if "reward" not in entry:
            continue
        row = {"step": entry["step"], **{ours: entry[theirs] for theirs, ours in HISTORY.items() if theirs in entry}}
        row.update({f"reward_{name}": entry[f"rewards/{name}/mean"] for name in reward_names
                    if f"rewards/{name}/mean" in entry})
        rows.append(row)
    return rows


def _first_and_last(history: list[dict]) -> dict[str, float]:
    """The headline of a run: each logged quantity at its first and at its last step."""
    if not history:
        return {}
    first, last = history[0], history[-1]
    keys = [k for k in last if k != "step"]
    return {**{f"train_first_{k}": first.get(k) for k in keys}, **{f"train_{k}": last[k] for k in keys}}


def _reward_files(config: GRPOConfig) -> dict[str, str]:
    """Hashes of the users' reward files, so a changed reward changes the manifest (and a pipeline's cache key)."""
    from stages.core.data import data_hash

    files = {spec.fn.rpartition(":")[0] for spec in config.rewards if spec.fn.rpartition(":")[0].endswith(".py")}
    return {path: data_hash(path) for path in sorted(files)}


def preflight(config: GRPOConfig, skip=lambda path: False) -> None:
    """The prompts read and the rewards imported as run() does (``lorelay run`` checks before loading)."""
    specs = [spec for spec in config.data.datasets if not skip(spec.path)]
    if specs or not config.data.datasets:
        load_prompts(specs, seed=config.training.seed, eval_count=config.data.eval_prompts)
    load_rewards(config.rewards, where="rewards")


STAGE = Stage(
    name="grpo", config_class=GRPOConfig, run=run,
    description="Online RL from rewards and checks (GRPO, GSPO).",
    produces_policy=True,
    headline=(Metric("train_reward", "reward"), Metric("seconds_per_step", "s/step", "{:.1f}")),
    card_tags=("grpo",),
    # train_*: each quantity TRL logs (reward, kl, lengths) at the last step; eval_*: each reward and check
    metrics=("train_loss", "train_runtime_s", "steps", "seconds_per_step", "trainable_parameters",
             "total_parameters", "train_*", "train_first_*", "eval_reward_*", "eval_pass_rate_*",
             "eval_before_reward_*", "eval_before_pass_rate_*"),
    preflight=preflight,
)
