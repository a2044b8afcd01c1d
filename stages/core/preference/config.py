"""The preference recipe's config (``stages/dpo.py``): data, training defaults, and the method-specific keys.

Settings that do not combine are refused here, before anything loads, each naming its key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from stages.core import compat
from stages.core.config import field
from stages.core.data import DatasetSpec
from stages.core.errors import ConfigError, did_you_mean
from stages.core.modeling import LoraSettings, ModelConfig
from stages.core.training import TrainingConfig, check_trl_args

Method = Literal["dpo", "orpo", "kto"]

# Each method's TRL config class ("module:Class"): the recipe builds it, trl_args are checked against it.
TRL_CONFIGS = {"dpo": "trl:DPOConfig", "orpo": "trl.experimental.orpo:ORPOConfig", "kto": "trl:KTOConfig"}

@dataclasses.dataclass
class PreferenceData:
    datasets: list[DatasetSpec] = field(
        default_factory=list, help="Training datasets (pairs; KTO rows for method kto), mixed by weight or count.")
    eval_datasets: list[DatasetSpec] = field(
        default_factory=list, help="Held-out datasets; when empty, eval_ratio splits the training mix.")
    eval_ratio: float = field(0.05, help="Fraction of the training mix held out for evaluation (seeded).")
    max_length: int | None = field(
        1024, help="Prompt + reply tokens kept: the reply's end is cut, pairs whose prompt alone fills it are "
                   "dropped (both counted). TRL 1.16 has no separate prompt/completion limits for DPO.")
    padding_free: bool | None = field(
        None, help="lorelay's packed rows (no padding, LM head on completion tokens only; dpo and orpo hold each "
                   "prompt once, kto one segment per sequence; stages/core/preference). null: on wherever the loss, "
                   "model and attention kernel allow it, else TRL's padded batches with the reason printed; true: "
                   "refuse to pad; false: TRL's padded batches.")
    skip_invalid: bool = field(False, help="Skip malformed rows (counted in metrics) instead of stopping.")

    def __post_init__(self):
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ConfigError("must be in [0, 1)", field="eval_ratio")
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError("must be at least 8 tokens, or null for no limit", field="max_length")


@dataclasses.dataclass
class DPOTraining(TrainingConfig):
    # Defaults that differ from TrainingConfig (the SFT defaults): preference tuning nudges a trained adapter.
    output_dir: Path = field(Path("outputs/dpo"), help="Where the finished stage is written (atomically).")
    batch_size: int = field(4, help="Pairs per device per micro-batch (each pair is two sequences).")
    gradient_accumulation_steps: int = field(
        2, help="Micro-batches per optimizer step. Global batch = batch_size x accumulation x processes pairs.")
    learning_rate: float = field(
        5e-5, help="Peak learning rate: 5e-5..1e-4 suits LoRA DPO (TRL's default 1e-6 is for full fine-tuning).")
    warmup_ratio: float = field(0.1, help="Fraction of steps spent warming up linearly from 0.")


@dataclasses.dataclass
class DPOConfig:
    model: ModelConfig = field(
        default_factory=ModelConfig, help="Base model (ignored inside a pipeline, which shares its base).")
    lora: LoraSettings = field(
        default_factory=LoraSettings, help="Adapter shape without an incoming adapter (an incoming one's shape wins).")
    data: PreferenceData = field(default_factory=PreferenceData, help="Preference datasets and lengths.")
    training: DPOTraining = field(default_factory=DPOTraining, help="Optimisation and output settings.")
    method: Method = field(
        "dpo", help="dpo (against a frozen reference), orpo (no reference) or kto (unpaired good/bad labels).")
    beta: float = field(
        0.1, help="dpo/kto: how far the policy may move from the reference (higher: less); ipo: tau; "
                  "orpo: lambda, the weight of the odds-ratio term.")
    loss_type: str | list[str] | None = field(
        None, help="dpo: one of TRL's DPOConfig loss types (sigmoid, hinge, ipo, apo_zero, ...), or a list of them "
                   "summed with loss_weights (default sigmoid). kto: kto or apo_zero_unpaired (KTOConfig's choices; "
                   "default kto). orpo: not used.")
    loss_weights: list[float] | None = field(None, help="dpo: weight of each loss in loss_type (default 1.0 each).")
    rpo_alpha: float | None = field(
        None, help="dpo: weight of an SFT (negative log-likelihood) term on the chosen replies, added to the "
                   "preference loss (RPO): it keeps the policy's likelihood of the right answers from falling. "
                   "TRL 1.16 spells it as an extra `sft` loss; this key appends it with this weight.")
    label_smoothing: float = field(
        0.0, help="dpo robust: probability a label is flipped, in [0, 0.5); exo_pair: epsilon (> 0, e.g. 1e-3).")
    precompute_ref_log_probs: bool | None = field(
        None, help="dpo/kto: compute the frozen reference's log-probs of all data in one pass before training "
                   "(cached with TRL's dataset cache) instead of in every step. null: on when training passes over "
                   "the data more than once (training.epochs > 1), where it saves a reference forward per pass.")
    desirable_weight: float = field(
        1.0, help="kto: weight of the desirable examples' loss (raise it when they are fewer).")
    undesirable_weight: float = field(1.0, help="kto: weight of the undesirable examples' loss.")
    reward_model: Path | None = field(
        None, help="Reward-model stage directory that judges policy against reference replies (win rate); "
                   "skipped with a message when it does not exist.")
    win_rate_prompts: DatasetSpec | Path | None = field(
        None, help="Held-out prompts for the win rate and samples.json: rows with a `prompt` string (or message "
                   "list) or `messages` ending in a user turn. Default: the eval pairs' prompts.")
    win_rate_samples: int = field(32, help="Prompts judged for the win rate (the first N).")
    win_rate_tie_margin: float = field(
        0.0, help="Reward differences at most this large count as ties (identical replies always do).")
    sample_prompts: int = field(
        4, help="Prompts answered by policy and reference for samples.json when there is no reward model.")
    max_new_tokens: int = field(64, help="Length limit of the greedy replies (win rate and samples).")
    generation_batch_size: int = field(8, help="Prompts per generation and scoring batch.")

    def __post_init__(self):
        check_trl_args(self.training.trl_args, TRL_CONFIGS[self.method])
        if not self.data.datasets:
            raise ConfigError("at least one training dataset is needed", field="data.datasets")
        if self.beta <= 0:
            raise ConfigError("must be positive", field="beta")
        if isinstance(self.win_rate_prompts, (str, Path)):
            self.win_rate_prompts = DatasetSpec(path=str(self.win_rate_prompts))
        for name in ("win_rate_samples", "sample_prompts", "max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", field=name)
        if self.win_rate_tie_margin < 0:
            raise ConfigError("must be zero or positive", field="win_rate_tie_margin")
        self._check_formats()
        {"dpo": self._check_dpo, "orpo": self._check_orpo, "kto": self._check_kto}[self.method]()

    def _check_formats(self) -> None:
        """The data a method trains on: pairs for dpo/orpo; KTO rows, or pairs declared as such, for kto."""
        declared = {spec.format for spec in [*self.data.datasets, *self.data.eval_datasets]} - {"auto"}
        usable = ("kto", "preference") if self.method == "kto" else ("preference",)
        for fmt in sorted(declared - set(usable)):
            hint = "; use method: kto for unpaired (prompt, completion, label) rows" if fmt == "kto" else ""
            raise ConfigError(f"{self.method} trains on {' or '.join(usable)} data, not '{fmt}'{hint}",
                              field="data.datasets")
        if self.method == "kto" and "preference" in declared:
            specs = [*self.data.datasets, *self.data.eval_datasets]
            if any(spec.format != "preference" for spec in specs):
                raise ConfigError("kto reads either KTO rows or pairs in one run: declare format: preference on "
                                  "every dataset (pairs are split into a desirable and an undesirable example), "
                                  "or on none", field="data.datasets")

    def _check_dpo(self) -> None:
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type or ["sigmoid"])
        if not losses:
            raise ConfigError("name at least one loss", field="loss_type")
        for loss in losses:
            if loss not in compat.dpo_loss_types():
                raise ConfigError(f"unknown DPO loss '{loss}'{_suggest(loss, compat.dpo_loss_types())}; expected "
                                  f"one of {', '.join(compat.dpo_loss_types())}", field="loss_type")
        if len(set(losses)) != len(losses):
            raise ConfigError("a loss is listed twice; give it a larger weight instead", field="loss_type")
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ConfigError(f"{len(self.loss_weights)} weights for {len(losses)} loss types: give one weight "
                              "per loss", field="loss_weights")
        if self.rpo_alpha is not None:
            if self.rpo_alpha <= 0:
                raise ConfigError("must be positive (or null for no SFT term)", field="rpo_alpha")
            if "sft" in losses:
                raise ConfigError("loss_type already has an sft term: give its weight in loss_weights, or drop it "
                                  "from loss_type and keep rpo_alpha", field="rpo_alpha")
            self.loss_weights = [*(self.loss_weights or [1.0] * len(losses)), self.rpo_alpha]
            losses.append("sft")
            self.rpo_alpha = None  # folded into loss_type/loss_weights: validating the result again is a no-op
        if "exo_pair" in losses and self.label_smoothing <= 0:
            raise ConfigError("exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)", field="label_smoothing")
        if "robust" in losses and not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("robust DPO reads it as a flip probability: must be in [0, 0.5)", field="label_smoothing")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("must be in [0, 1)", field="label_smoothing")
        self.loss_type = losses

    def _check_orpo(self) -> None:
        for name, default in (("loss_type", None), ("loss_weights", None), ("rpo_alpha", None),
                              ("label_smoothing", 0.0), ("precompute_ref_log_probs", None)):
            if getattr(self, name) != default:
                raise ConfigError("ORPO has no reference model and one fixed loss: this key does not apply "
                                  "(remove it, or use method: dpo)", field=name)

    def _check_kto(self) -> None:
        loss = self.loss_type or "kto"
        if not isinstance(loss, str) or loss not in compat.kto_loss_types():
            shown = loss if isinstance(loss, str) else loss[0] if len(loss) == 1 else loss
            raise ConfigError(f"KTO's loss is one of {', '.join(compat.kto_loss_types())}, got {shown!r}"
                              f"{_suggest(str(shown), compat.kto_loss_types())}", field="loss_type")
        for name in ("loss_weights", "rpo_alpha"):
            if getattr(self, name) is not None:
                raise ConfigError("KTO has one loss; weigh its two sides with desirable_weight/undesirable_weight",
                                  field=name)
        if self.label_smoothing != 0.0:
            raise ConfigError("KTO has no label smoothing", field="label_smoothing")
        if min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise ConfigError("must be positive", field="desirable_weight")
        if loss == "kto" and self.training.batch_size < 2:
            raise ConfigError("the KTO loss estimates its KL term from the other examples of a micro-batch: "
                              "batch_size must be at least 2 (or use loss_type: apo_zero_unpaired)",
                              field="training.batch_size")
        self.loss_type = loss


def _suggest(name: str, choices) -> str:
    # In the message itself: load_config keeps an error's message and field when it re-raises, not its hint.
    guess = did_you_mean(name, choices)
    return f" ({guess})" if guess else ""


def precompute_reference(config: DPOConfig) -> bool:
    """Reference log-probs in one pass before training: as configured, else when the data is seen twice or more."""
    if config.precompute_ref_log_probs is not None:
        return config.precompute_ref_log_probs
    return config.training.max_steps <= 0 and config.training.epochs > 1
