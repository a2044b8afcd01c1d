"""Preference optimisation from an SFT adapter: DPO, ORPO or KTO on the shared base, judged by a reward model.

This recipe supports:
- ``method: dpo``: TRL's DPOTrainer with every loss its DPOConfig offers (``sigmoid``, ``ipo``, ``robust``,
  ``apo_zero``, ...), alone or as a weighted sum (``loss_type: [sigmoid, bco_pair, sft]`` with
  ``loss_weights: [0.8, 0.2, 1.0]`` is MPO; ``[sigmoid, sft]`` is RPO);
- ``method: orpo``: TRL's ORPOTrainer (``trl.experimental.orpo``): SFT loss plus an odds-ratio term, no reference;
- ``method: kto``: TRL's KTOTrainer on unpaired desirable/undesirable completions (``format: kto`` rows), or on
  pairs split into one of each (declare ``format: preference`` on every dataset);
- packed batches (``data.padding_free``, on by default) for all three methods: padding-free rows with the LM
  head on completion tokens only, each prompt once for dpo and orpo, one segment per sequence for kto
  (``stages.core.preference``); TRL's padded batches where a loss, model or attention kernel rules them out,
  with the reason printed and kept in metrics.json (``batching``);
- a reference policy without a second copy of the base. Continuing an incoming adapter, TRL adds a frozen copy
  of it named ``ref`` next to the trained ``default`` adapter and switches to it for the reference forward; with no
  incoming adapter the reference is the base with adapters disabled. Both live on the one shared base;
- win rate: the trained policy against the reference, greedy replies to held-out prompts judged by a reward-model
  stage directory (``reward_model``), when one is given and exists.

Assumptions: the base is shared with other stages (a ``Base`` from ``stages.core.modeling.load_base``) and comes back
bare; the incoming adapter (``adapter=``) is a LoRA adapter of that base, e.g. the SFT stage's output.

Config: ``DPOConfig`` in ``stages.core.preference.config``. Sampling and judging: ``stages.core.evaluation`` (as in
the pipeline report).

Raises: ``ConfigError`` for settings that do not combine (checked before anything loads), ``DataError`` naming
file:line for a malformed pair, or when no pair survives ``data.max_length``.

Output directory: the trained policy adapter only (never the ``ref`` copy), tokenizer with chat template,
metrics.json (final eval reward accuracy, margins and log-probs, train history, win rate), samples.json (the
policy's and the reference's replies to the held-out prompts, with their reward scores), manifest.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.core import compat
from stages.core.data import Mixture, data_hash, load_mixture
from stages.core.data.sample import SAMPLE_ROWS, sample_stage_data
from stages.core.errors import DataError
from stages.core.evaluation import greedy_replies, judge_replies, read_prompts, reward_verdicts
from stages.core.judges import tally
from stages.core.lifecycle import borrows_base
from stages.core.modeling import Base, attach_adapter, detach_adapter
from stages.core.preference.config import TRL_CONFIGS, DPOConfig, precompute_reference
from stages.core.preference.batching import report_batching
from stages.core.preference.trainer_metrics import (HEADLINE, eval_metrics, final_train_metrics, length_report,
                                                    train_history)
from stages.core.stage import FIT_METRICS, Metric, Stage
from stages.core.training import (StageOutput, callbacks, fit, is_main_process, quiet_trainer, seed_everything,
                                  trainable_parameters, trainer_args)


# ----------------------------------------------------------------------------------------------
# the methods: which TRL trainer, which config, which data, and the arguments only it takes
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MethodSpec:
    trainer: str                                  # "module:Class"
    args: str                                     # "module:Class" of its TRL config
    reference: bool                               # trains against a frozen reference policy
    stage_args: Callable[[DPOConfig], dict[str, Any]]

    def classes(self):
        return tuple(getattr(importlib.import_module(path.partition(":")[0]), path.partition(":")[2])
                     for path in (self.trainer, self.args))


METHODS: dict[str, MethodSpec] = {
    "dpo": MethodSpec("trl:DPOTrainer", TRL_CONFIGS["dpo"], reference=True, stage_args=lambda c: dict(
        beta=c.beta, loss_type=c.loss_type, loss_weights=c.loss_weights, label_smoothing=c.label_smoothing,
        precompute_ref_log_probs=precompute_reference(c), max_length=c.data.max_length)),
    "orpo": MethodSpec("trl.experimental.orpo:ORPOTrainer", TRL_CONFIGS["orpo"], reference=False,
                       stage_args=lambda c: dict(beta=c.beta, max_length=c.data.max_length)),
    "kto": MethodSpec("trl:KTOTrainer", TRL_CONFIGS["kto"], reference=True, stage_args=lambda c: dict(
        beta=c.beta, loss_type=c.loss_type, desirable_weight=c.desirable_weight,
        undesirable_weight=c.undesirable_weight, precompute_ref_log_probs=precompute_reference(c),
        max_length=c.data.max_length)),
}


@borrows_base
def run(config: DPOConfig, base: Base, adapter: str | Path | None = None) -> Path:
    """Train a preference adapter on ``base`` from ``adapter`` (or a fresh one); return the output directory."""
    from datasets import Dataset

    training, data = config.training, config.data
    method = METHODS[config.method]
    output = StageOutput(training.output_dir, stage="dpo", resume=training.resume,
                         restart=training.restart)
    judge_dir = _reward_model_dir(config)

    # ---- data: load, validate, mix, split; held-out prompts for the win rate --------------------
    started = time.time()
    mixture = load_preferences(config)
    train_dataset = Dataset.from_list([trainer_row(r) for r in mixture.train])
    eval_dataset = Dataset.from_list([trainer_row(r) for r in mixture.eval]) if mixture.eval else None
    prompts = held_out_prompts(config, mixture, count=config.win_rate_samples if judge_dir else config.sample_prompts)
    replies = functools.partial(greedy_replies, tokenizer=base.tokenizer, prompts=[p["messages"] for p in prompts],
                                max_new_tokens=config.max_new_tokens, batch_size=config.generation_batch_size)
    output.mark("data", started)

    # ---- model: the incoming adapter, trainable, on the shared base --------------------------------
    seed_everything(config.training.seed)  # the LoRA initialisation follows training.seed
    model = attach_adapter(base.model, config.lora, init_from=adapter,
                           allow_pickle_weights=base.config.allow_pickle_weights)
    try:
        # Reference replies before training only when nothing keeps the starting point (ORPO from an adapter).
        reference_replies = replies(model) if not method.reference and adapter else None

        # ---- train --------------------------------------------------------------------------------
        trainer_class, args_class = method.classes()
        if data.padding_free is not False:  # lorelay's packed rows where they apply, else TRL's (said why)
            trainer_class = compat.packed_preference_trainer(config.method)
        args = trainer_args(args_class, training, base, output.work_dir, has_eval=eval_dataset is not None,
                            **method.stage_args(config))
        trainer = quiet_trainer(trainer_class(
            model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=base.tokenizer,
            callbacks=callbacks(training, has_eval=eval_dataset is not None, title=config.method)))
        batching = report_batching(config.method, data.padding_free, trainer)
        reference = settle_reference(model, method, adapter)
        # KTO splits each pair it is given into a desirable and an undesirable example.
        per_record = 2 if config.method == "kto" and "chosen" in train_dataset.column_names else 1
        lengths = {
            "train": length_report(trainer.train_dataset, per_record * len(mixture.train), data.max_length),
            "eval": length_report(trainer.eval_dataset, per_record * len(mixture.eval), data.max_length)}
        if lengths["train"]["used"] == 0:
            raise DataError("no training example is left: every prompt fills data.max_length",
                            field="data.max_length", hint="raise data.max_length")
        result = fit(trainer, output, training)

        # ---- evaluate: TRL's preference metrics on held-out pairs, then ALL generation -----------------
        started = time.time()
        metrics: dict[str, Any] = {"method": config.method, "reference": reference, "batching": batching,
                                   "train_loss": result.training_loss,
                                   "train_runtime_s": result.metrics.get("train_runtime"),
                                   "steps": trainer.state.global_step}
        metrics.update(final_train_metrics(trainer.state.log_history))
        if eval_dataset is not None:
            metrics.update(eval_metrics(trainer.evaluate()))
        samples = []
        if is_main_process():
            policy = replies(model)
            if reference_replies is None:
                with reference_policy(model):
                    reference_replies = replies(model)
            samples = [{"prompt": p["messages"][-1]["content"], "source": p["source"], "policy": a, "reference": r}
                       for p, a, r in zip(prompts, policy, reference_replies)]
        trainable, total = trainable_parameters(model)
        metrics.update(trainable_parameters=trainable, total_parameters=total,
                       data={"datasets": mixture.report, "lengths": lengths})
        output.mark("evaluate", started)

        # ---- save the policy adapter (never the frozen "ref" copy) -----------------------------------
        if is_main_process():
            model.save_pretrained(output.staging, safe_serialization=True, selected_adapters=["default"])
            base.tokenizer.save_pretrained(output.staging)
    finally:
        detach_adapter(model)  # also undoes TRL's fused-LM-head patch of the base's forward

    # ---- judge: the DPO adapter is off the base; the reward model goes on it ----------------------
    if is_main_process():
        started = time.time()
        if judge_dir is not None and samples:
            metrics.update(judge(base, judge_dir, prompts, samples, tie_margin=config.win_rate_tie_margin,
                                 batch_size=config.generation_batch_size))
        else:
            metrics["win_rate_skipped"] = _skip_reason(config)
        output.mark("judge", started)
        output.write_json("metrics.json", {**metrics, "train_history": train_history(trainer.state.log_history),
                                           "log_history": trainer.state.log_history})
        output.write_json("samples.json", samples)
        hashes = dict(mixture.data_hashes)
        if config.win_rate_prompts is not None:
            hashes[config.win_rate_prompts.path] = data_hash(config.win_rate_prompts.path)
        output.commit(config=config, base=base, data_hashes=hashes, metrics=metrics,
                      extra={"init_from": str(adapter) if adapter else None,
                             "reward_model": str(judge_dir) if judge_dir else None})
    trainer.accelerator.wait_for_everyone()
    return output.output_dir


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def load_preferences(config: DPOConfig) -> Mixture:
    """Pairs (dpo, orpo, kto on declared pairs) or KTO rows, checked row by row by ``stages.core.data``."""
    data = config.data
    return load_mixture(data.datasets, kind=data_kind(config), seed=config.training.seed,
                        eval_ratio=data.eval_ratio, eval_specs=data.eval_datasets or None,
                        skip_invalid=data.skip_invalid)


def data_kind(config: DPOConfig) -> str:
    """What the rows are: pairs (dpo, orpo, and kto on datasets all declared as pairs) or KTO rows."""
    specs = [*config.data.datasets, *config.data.eval_datasets]
    pairs = config.method != "kto" or all(spec.format == "preference" for spec in specs)
    return "preference" if pairs else "kto"


def trainer_row(record: dict) -> dict:
    """The conversational columns TRL's trainers read (they apply the chat template themselves)."""
    if "label" in record:
        return {"prompt": record["prompt"], "completion": record["completion"], "label": bool(record["label"])}
    return {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]}


def held_out_prompts(config: DPOConfig, mixture: Mixture, *, count: int) -> list[dict]:
    """Prompt conversations (ending in a user turn) for generation: the prompts file, or the eval prompts."""
    if config.win_rate_prompts is not None:
        return read_prompts(config.win_rate_prompts, count)
    prompts: list[dict] = []
    seen = set()
    for record in mixture.eval:
        key = repr(record["prompt"])
        if key not in seen and record["prompt"][-1]["role"] == "user":
            seen.add(key)
            prompts.append({"messages": record["prompt"], "source": record["source"]})
        if len(prompts) >= count:
            break
    return prompts


# ----------------------------------------------------------------------------------------------
# the reference policy and the judge
# ----------------------------------------------------------------------------------------------

def settle_reference(model, method: MethodSpec, adapter) -> str:
    """What the trainer compares against, in words for metrics.json.

    TRL's DPO/KTO trainers, given a PeftModel and no ref_model, add a frozen copy of its adapter named "ref"
    and switch to it for the reference forward (trl/trainer/dpo_trainer.py). A fresh adapter's copy is the
    base itself (LoRA B starts at zero), so it is dropped: TRL then runs the reference with adapters disabled.
    """
    if method.reference and adapter is None and compat.has_reference_adapter(model):
        model.delete_adapter(compat.TRL_REFERENCE_ADAPTER)
    if compat.has_reference_adapter(model):
        return "adapter copy 'ref' (the incoming adapter, frozen)"
    return "base (adapters disabled)" if method.reference else "none (ORPO)"


@contextlib.contextmanager
def reference_policy(model):
    """Make ``model`` the frozen reference TRL trained against: the ``ref`` adapter copy, or the bare base."""
    if compat.has_reference_adapter(model):
        previous = model.active_adapter
        model.set_adapter(compat.TRL_REFERENCE_ADAPTER, inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(previous)
    else:
        with model.disable_adapter():
            yield model


def _reward_model_dir(config: DPOConfig) -> Path | None:
    if config.reward_model is None:
        return None
    if not Path(config.reward_model).exists():
        print(f"lorelay: reward model {config.reward_model} not found; the win rate is skipped "
              "(train one with `make rm`, or drop `reward_model`)")
        return None
    return Path(config.reward_model)


def _skip_reason(config: DPOConfig) -> str:
    if config.reward_model is None:
        return "no reward_model configured"
    if not Path(config.reward_model).exists():
        return f"reward model {config.reward_model} not found"
    return "no held-out prompts"


OUTCOMES = {1: "win", -1: "loss", 0: "tie"}


def judge(base: Base, rm_dir: Path, prompts: list[dict], samples: list[dict], *, tie_margin: float = 0.0,
          batch_size: int = 8) -> dict[str, Any]:
    """Policy against reference, judged by the reward model; the scores and outcomes go into ``samples``.

    Call it with no adapter on ``base``: the reward adapter and its head go on the same base.
    """
    policy = [s["policy"] for s in samples]
    reference = [s["reference"] for s in samples]
    scores = judge_replies(base, rm_dir, [p["messages"] for p in prompts], {"policy": policy, "reference": reference},
                           batch_size=batch_size)
    verdicts = reward_verdicts(scores["policy"], scores["reference"], my_replies=policy, their_replies=reference,
                               tie_margin=tie_margin)
    for sample, mine, theirs, verdict in zip(samples, scores["policy"], scores["reference"], verdicts):
        sample.update(policy_score=float(mine), reference_score=float(theirs), outcome=OUTCOMES[verdict])
    counts, n = tally(verdicts), len(verdicts)
    decided = counts["wins"] + counts["losses"]
    return {"win_rate": counts["win_rate_vs_parent"] if n else None,
            "win_rate_excl_ties": counts["wins"] / decided if decided else None,
            "wins": counts["wins"], "losses": counts["losses"], "ties": counts["ties"], "win_rate_n": n,
            "reward_policy_mean": sum(scores["policy"]) / n if n else None,
            "reward_reference_mean": sum(scores["reference"]) / n if n else None}


def preflight(config: DPOConfig, skip=lambda path: False) -> None:
    """The first rows of every dataset and of the win-rate prompts, read as run() reads them."""
    sample_stage_data(config.data, data_kind(config), skip=skip)
    if config.win_rate_prompts is not None and not skip(config.win_rate_prompts.path):
        read_prompts(config.win_rate_prompts, SAMPLE_ROWS)


STAGE = Stage(
    name="dpo", config_class=DPOConfig, run=run,
    description="Preference optimisation: DPO, ORPO or KTO.",
    produces_policy=True,
    headline=(Metric("eval_loss", "eval loss"), Metric("eval_reward_accuracy", "DPO acc", "{:.1%}")),
    metrics=(*FIT_METRICS, "eval_loss",
             *(f"{split}_{name}" for split in ("train", "eval") for name in HEADLINE.values()),
             "win_rate", "win_rate_excl_ties", "wins", "losses", "ties", "win_rate_n", "reward_policy_mean",
             "reward_reference_mean"),
    preflight=preflight,
)
