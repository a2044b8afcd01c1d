"""Programmatic rewards and checks: named callables with TRL's reward signature, configured in YAML.

One concept, three users: the GRPO stage trains on them, ``generate`` keeps only chosen replies that pass
them, and evaluation reports each policy's pass rate per check. A reward is any callable

    fn(prompts, completions, **columns) -> list[float | None]

(TRL's reward-function signature): one value per completion, ``None`` where it does not apply to that row.
Completions (and prompts) are strings, or message lists in conversational data; ``text_of`` reads either.
A check is a reward that returns 1.0 (pass) or 0.0 (fail).

A config names a reward by a string (``RewardSpec.fn``):
- a built-in (``stages.core.checks``: exact_match, regex, contains, not_contains, ends_with, json_valid,
  length), configured through ``args``;
- ``package.module:function``, importable from the current environment;
- ``path/to/file.py:function``, a file of the project (relative to the current directory).

Everything that can be checked without data is checked when the config is read (so before any model loads):
the name, the import, the function's signature against ``args``, a built-in's argument values. What needs data
(a missing column, a wrong-length or non-number result) is checked by ``check_rewards`` on a few rows of the
training data, before the model loads, and again on every call.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.core.config import field
from stages.core.errors import ConfigError, LorelayError, did_you_mean

REWARDS: dict[str, Callable[..., list[float | None]]] = {}

# Keyword arguments TRL's GRPOTrainer passes to every reward besides the data columns (trl/trainer/grpo_trainer.py).
CALL_CONTEXT = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                "environments")

PASS = 1.0  # a check passes with full marks; pass_rates counts values >= PASS


def register(name: str, *, check_args: Callable[..., None] | None = None):
    """Decorator: make ``fn`` the built-in reward ``name``. ``check_args(**args)`` raises ValueError for bad values."""
    def decorate(fn):
        if name in REWARDS:
            raise ValueError(f"reward '{name}' is registered twice")
        fn.check_args = check_args
        REWARDS[name] = fn
        return fn
    return decorate


@dataclasses.dataclass
class RewardSpec:
    """One entry of a ``rewards:`` list."""

    fn: str = field(help="A built-in reward's name, 'package.module:function', or 'path/to/file.py:function'.")
    weight: float = field(1.0, help="Weight of this reward in the sum GRPO trains on (0 logs it without training on it).")
    name: str | None = field(None, help="Label in logs and the report. Default: the built-in's or function's name.")
    args: dict[str, Any] = field(default_factory=dict, help="Keyword arguments of the function (e.g. pattern, column, text).")

    def __post_init__(self):
        if not math.isfinite(self.weight):
            raise ConfigError("must be a finite number", field="weight")
        function, builtin = resolve(self.fn)
        check_signature(function, self.args, builtin=builtin)
        if builtin and function.check_args is not None:
            try:
                function.check_args(**self.args)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{self.fn}: {err}", field="args") from None
        if self.name is None:
            self.name = self.fn if builtin else self.fn.rpartition(":")[2]
        if not self.name or any(c in self.name for c in "/ \t\n"):
            raise ConfigError(f"'{self.name}' cannot label a metric: use letters, digits, '_' or '-'", field="name")
        self.source: str | None = None  # "file:line", set by the config loader

    def locate(self, file: str | None, line: int | None) -> None:
        """Called by ``stages.core.config`` with where this entry was written, for errors at call time."""
        self.source = f"{file}:{line}" if file and line else file


class Reward:
    """A resolved reward: ``reward(prompts, completions, **columns) -> list[float | None]``, output checked.

    ``__name__`` is the label, so TRL logs it as ``rewards/<name>/mean``.
    """

    def __init__(self, spec: RewardSpec, function: Callable, *, where: str | None = None):
        self.spec, self.function = spec, function
        self.name = self.__name__ = spec.name
        self.fn, self.weight = spec.fn, spec.weight
        self.where = where
        parameters = inspect.signature(function).parameters.values()
        self._takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters)
        self._accepts = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, fn={self.spec.fn!r}, weight={self.weight})"

    def describe(self) -> str:
        """How errors name this reward: its label, function and config line."""
        at = self.spec.source or self.where
        return f"reward '{self.name}' ({self.spec.fn}{', ' + at if at else ''})"

    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> list[float | None]:
        kwargs = {"prompts": prompts, "completions": completions, **columns, **self.spec.args}
        if not self._takes_all:  # a function may take only what it reads, e.g. fn(completions, answer)
            kwargs = {key: value for key, value in kwargs.items() if key in self._accepts}
        try:
            values = self.function(**kwargs)
        except LorelayError as err:  # a built-in's complaint about the data (a missing column): say which reward
            raise self.error(err.reason) from None
        return self._checked(values, len(completions))

    def _checked(self, values: Any, expected: int) -> list[float | None]:
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
            if hasattr(values, "tolist"):  # a tensor or array
                values = values.tolist()
            else:
                raise self.error(f"returned {type(values).__name__}, expected a list of numbers (or None) with one "
                                 "value per completion")
        if len(values) != expected:
            raise self.error(f"returned {len(values)} values for {expected} completions: one value per completion, "
                             "None where it does not apply")
        checked: list[float | None] = []
        for index, value in enumerate(values):
            if value is None:
                checked.append(None)
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise self.error(f"value {index} is {value!r} ({type(value).__name__}), expected a number or None")
            value = float(value)
            if math.isinf(value):
                raise self.error(f"value {index} is infinite")
            checked.append(None if math.isnan(value) else value)
        return checked

    def error(self, message: str) -> ConfigError:
        file, _, line = (self.spec.source or "").rpartition(":")
        if line.isdigit():
            return ConfigError(f"reward '{self.name}' ({self.spec.fn}) {message}", file=file, line=int(line),
                               field="fn")
        return ConfigError(f"{self.describe()} {message}")


# ----------------------------------------------------------------------------------------------
# resolving a spec's function
# ----------------------------------------------------------------------------------------------

def resolve(fn: str) -> tuple[Callable, bool]:
    """The function ``fn`` names, and whether it is a built-in. ConfigError (field ``fn``) when it cannot be had."""
    if not isinstance(fn, str) or not fn.strip():
        raise ConfigError("name a built-in reward or 'module:function'", field="fn")
    if ":" not in fn:
        if fn in REWARDS:
            return REWARDS[fn], True
        guess = did_you_mean(fn, REWARDS)
        raise ConfigError(f"unknown built-in reward '{fn}'" + (f"; {guess}" if guess else "") +
                          f" (built-ins: {', '.join(sorted(REWARDS))}; a function of your own is 'module:function' "
                          "or 'path/file.py:function')", field="fn")
    location, _, attribute = fn.rpartition(":")
    if not location or not attribute.isidentifier():
        raise ConfigError(f"'{fn}' is not of the form 'module:function' or 'path/file.py:function'", field="fn")
    module = _import_file(location) if location.endswith(".py") else _import_module(location)
    function = getattr(module, attribute, None)
    if function is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        guess = did_you_mean(attribute, names)
        raise ConfigError(f"'{location}' has no function '{attribute}'" + (f"; {guess}" if guess else ""), field="fn")
    if not callable(function):
        raise ConfigError(f"'{fn}' is a {type(function).__name__}, not a function", field="fn")
    return function, False


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"cannot import module '{name}': {err}", field="fn",
                          hint="is it on PYTHONPATH? A file of the project is written 'path/to/file.py:function'") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing: say how
        raise ConfigError(f"importing module '{name}' failed: {type(err).__name__}: {err}", field="fn") from None


def _import_file(path: str):
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"reward file '{path}' not found (paths are relative to {Path.cwd()})", field="fn")
    module_name = f"lorelay_rewards.{file.resolve().as_posix().strip('/').replace('/', '.').removesuffix('.py')}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickling the functions (dataloader workers, accelerate) finds it here
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file failed while importing: say how
        del sys.modules[module_name]
        raise ConfigError(f"running '{path}' failed: {type(err).__name__}: {err}", field="fn") from None
    return module


def check_signature(function: Callable, args: Mapping[str, Any], *, builtin: bool) -> None:
    """``function`` takes completions and every key of ``args`` (a built-in names each; its **columns do not count)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        raise ConfigError(f"cannot read the signature of {function!r}", field="fn") from None
    takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    named = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if "completions" not in named and not takes_all:
        raise ConfigError(f"{_title(function)} does not take `completions`: a reward is "
                          "fn(prompts, completions, **columns) -> list[float | None]", field="fn")
    if inspect.iscoroutinefunction(function):
        raise ConfigError(f"{_title(function)} is async; a reward is a plain function", field="fn")
    positional_only = [n for n, p in parameters.items() if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        raise ConfigError(f"{_title(function)} has positional-only parameters ({', '.join(positional_only)}); "
                          "rewards are called with keyword arguments", field="fn")
    options = [n for n in named if n not in CALL_CONTEXT]
    for key in args:
        if key in CALL_CONTEXT:
            raise ConfigError(f"'{key}' is passed by the trainer, not set in args", field=f"args.{key}")
        if key not in options and (builtin or not takes_all):
            guess = did_you_mean(key, options)
            raise ConfigError(f"{_title(function)} has no argument '{key}'" + (f"; {guess}" if guess else "") +
                              f" (arguments: {', '.join(options) or 'none'})", field=f"args.{key}")
    if builtin:
        missing = [n for n in options if parameters[n].default is inspect.Parameter.empty and n not in args]
        if missing:
            raise ConfigError(f"{_title(function)} needs args.{missing[0]}", field="args")


def _title(function: Callable) -> str:
    return f"'{getattr(function, '__name__', function)}'"


# ----------------------------------------------------------------------------------------------
# the API used by stages
# ----------------------------------------------------------------------------------------------

def load_rewards(specs: Sequence[RewardSpec], *, where: str | None = None) -> list[Reward]:
    """Resolved rewards for ``specs`` (each already checked when its RewardSpec was built).

    ``where`` names the config for errors when a spec does not know its own line (built in code).
    Labels must be unique: they name the logged metrics.
    """
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if not isinstance(spec, RewardSpec):
            spec = RewardSpec(**spec) if isinstance(spec, Mapping) else spec
        function, _ = resolve(spec.fn)
        if spec.name in seen:
            raise ConfigError(f"reward label '{spec.name}' is used by entries {seen[spec.name]} and {index}; "
                              "give one a `name:`", file=spec.source or where, field=f"rewards.{index}.name")
        seen[spec.name] = index
        rewards.append(Reward(spec, function, where=where))
    return rewards


def check_rewards(rewards: Sequence[Reward], prompts: Sequence, completions: Sequence,
                  columns: Mapping[str, Sequence]) -> None:
    """Call each reward once on a few data rows (with stand-in completions) so data-dependent faults surface now:
    a missing column, an exception in a user's function, a wrong-length or non-number result."""
    for reward in rewards:
        try:
            reward(prompts, completions, **columns)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's function failed: name it and the cause
            raise reward.error(f"failed on a trial call with {len(prompts)} rows of the training data "
                               f"(columns: {', '.join(columns) or 'none'}): {type(err).__name__}: {err}") from None


def pass_rates(rewards: Sequence[Reward], prompts: Sequence, completions: Sequence,
               columns: Mapping[str, Sequence]) -> dict[str, float | None]:
    """Per reward label: passes (value >= 1.0) / rows where it applies (value not None); None when it applied nowhere."""
    rates: dict[str, float | None] = {}
    for reward in rewards:
        values = [v for v in reward(prompts, completions, **columns) if v is not None]
        rates[reward.name] = sum(v >= PASS for v in values) / len(values) if values else None
    return rates


# ----------------------------------------------------------------------------------------------
# completions as text
# ----------------------------------------------------------------------------------------------

def text_of(item: Any) -> str:
    """The text of a completion or prompt: a string, or a message list (the assistant turns' content)."""
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        return _content(item.get("content"))
    if isinstance(item, Sequence):
        messages = [m for m in item if isinstance(m, Mapping)]
        replies = [m for m in messages if m.get("role") == "assistant"] or messages
        return "\n".join(_content(m.get("content")) for m in replies)
    raise LorelayError(f"a completion must be a string or a list of messages, got {type(item).__name__}")


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return str(content)


# The built-ins register themselves on import; imported last because they use ``register`` and ``text_of``.
from stages.core import checks as _checks  # noqa: E402,F401
