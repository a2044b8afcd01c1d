"""Programmatic rewards: built-ins, user functions, and clean errors for bad specs (no model involved)."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from stages.core.config import field, load_config
from stages.core.errors import ConfigError
from stages.core.rewards import REWARDS, Reward, RewardSpec, check_rewards, load_rewards, pass_rates


@dataclasses.dataclass
class Holder:
    rewards: list[RewardSpec] = field(default_factory=list, help="rewards")


def reward(fn: str, **args) -> Reward:
    return load_rewards([RewardSpec(fn=fn, args=args)])[0]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ---- built-ins ---------------------------------------------------------------------------------

def test_every_builtin_is_registered():
    assert {"exact_match", "regex", "contains", "not_contains", "ends_with", "json_valid", "length"} <= set(REWARDS)


def test_exact_match_normalises_and_skips_rows_without_reference():
    check = reward("exact_match")
    completions = ["  Billing.", "TECHNICAL\n", "shipping", "anything"]
    answers = ["billing", "technical", "returns", None]
    assert check(["p"] * 4, completions, answer=answers) == [1.0, 1.0, 0.0, None]
    strict = reward("exact_match", normalize=False, column="label")
    assert strict(["p"] * 2, ["Billing", "billing "], label=["billing", "billing"]) == [0.0, 1.0]


def test_string_and_conversational_completions_score_the_same():
    check = reward("ends_with", text="— Nimbus Support")
    texts = ["Reset it. — Nimbus Support\n", "Reset it.", "— Nimbus Support, thanks"]
    assert check(["p"] * 3, texts) == check([[{"role": "user", "content": "p"}]] * 3, [reply(t) for t in texts]) \
        == [1.0, 0.0, 0.0]


def test_column_checks_do_not_apply_where_the_row_has_no_reference():
    check = reward("ends_with", column="sign_off")
    assert check(["p"] * 3, ["ok — N", "ok", "ok"], sign_off=["— N", "— N", ""]) == [1.0, 0.0, None]
    labels = reward("not_contains", column="forbidden", ignore_case=True)
    assert labels(["p"] * 3, ["Hi\n\nTechnical", "Hi", "Hi"], forbidden=[["technical", "billing"], ["billing"], None]) \
        == [0.0, 1.0, None]


def test_contains_all_or_any():
    assert reward("contains", text=["a", "b"])(["p"] * 2, ["ab", "a"]) == [1.0, 0.0]
    assert reward("contains", text=["a", "b"], any_of=True)(["p"] * 2, ["b", "c"]) == [1.0, 0.0]
    assert reward("not_contains", text="x")(["p"] * 2, ["abc", "xyz"]) == [1.0, 0.0]


def test_regex_modes():
    assert reward("regex", pattern=r"\d+")(["p"] * 2, ["a 12 b", "none"]) == [1.0, 0.0]
    assert reward("regex", pattern=r"\d+", mode="full")(["p"] * 2, ["12\n", "12 b"]) == [1.0, 0.0]
    assert reward("regex", pattern="^yes", ignore_case=True)(["p"], ["YES sir"]) == [1.0]


def test_json_valid_with_and_without_schema(tmp_path):
    completions = ['{"queue": "billing"}', '```json\n{"queue": 3}\n```', "not json"]
    assert reward("json_valid")(["p"] * 3, completions) == [1.0, 1.0, 0.0]
    schema = {"type": "object", "properties": {"queue": {"type": "string"}}, "required": ["queue"]}
    assert reward("json_valid", schema=schema)(["p"] * 3, completions) == [1.0, 0.0, 0.0]
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    assert reward("json_valid", schema=str(path))(["p"], ['{"queue": "x"}']) == [1.0]


def test_length_bounds_in_chars_words_and_tokens():
    assert reward("length", max=5)(["p"] * 2, ["12345", "123456"]) == [1.0, 0.0]
    assert reward("length", min=2, unit="words")(["p"] * 2, ["one two", "one"]) == [1.0, 0.0]
    assert reward("length", max=2, unit="tokens")(["p"] * 2, ["x", "y"], completion_ids=[[1, 2], [1, 2, 3]]) \
        == [1.0, 0.0]


def test_pass_rates_count_only_rows_where_a_check_applies():
    rewards = load_rewards([RewardSpec(fn="exact_match"), RewardSpec(fn="ends_with", args={"column": "sign_off"}),
                            RewardSpec(fn="contains", name="never_applies", args={"column": "empty"})])
    completions = ["billing", "returns", "Hi — N", "Hi"]
    columns = {"answer": ["billing", "billing", None, None], "sign_off": [None, None, "— N", "— N"],
               "empty": [None] * 4}
    assert pass_rates(rewards, ["p"] * 4, completions, columns) == \
        {"exact_match": 0.5, "ends_with": 0.5, "never_applies": None}


# ---- user functions ----------------------------------------------------------------------------

def test_module_function_and_file_function(tmp_path, monkeypatch):
    package = tmp_path / "myrewards"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(textwrap.dedent("""
        def polite(prompts, completions, word="please", **kwargs):
            return [float(word in c) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "local.py").write_text(textwrap.dedent("""
        def shorter_than_answer(completions, answer):   # only the column it needs: no **kwargs
            return [float(len(c) < len(a)) if a else None for c, a in zip(completions, answer)]
    """))
    monkeypatch.chdir(tmp_path)
    polite, shorter = load_rewards([RewardSpec(fn="myrewards.scoring:polite", args={"word": "thanks"}, weight=0.5),
                                    RewardSpec(fn="local.py:shorter_than_answer")])
    assert (polite.name, polite.weight, shorter.name) == ("polite", 0.5, "shorter_than_answer")
    columns = {"answer": ["long answer", None], "trainer_state": object()}
    assert polite(["p"] * 2, ["thanks!", "no"], **columns) == [1.0, 0.0]
    assert shorter(["p"] * 2, ["ok", "ok"], **columns) == [1.0, None]


# ---- errors: before anything loads, naming the line --------------------------------------------

def _load(tmp_path, body: str) -> Holder:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(body))
    return load_config(Holder, path)


@pytest.mark.parametrize("entry, line, expected", [
    ("{fn: exact_mach}", 3, "did you mean 'exact_match'"),
    ("{fn: regex, args: {patern: x}}", 3, "did you mean 'pattern'"),
    ("{fn: regex}", 3, "needs args.pattern"),
    ("{fn: regex, args: {pattern: '('}}", 3, "invalid regular expression"),
    ("{fn: contains, args: {text: a, column: b}}", 3, "exactly one of `text`"),
    ("{fn: length, args: {min: 5, max: 2}}", 3, "above `max`"),
    ("{fn: json_valid, args: {schema: {type: 12}}}", 3, "invalid JSON schema"),
    ("{fn: 'no_such_module_xyz:f'}", 3, "cannot import module 'no_such_module_xyz'"),
    ("{fn: 'os.path:joinn'}", 3, "did you mean 'join'"),
    ("{fn: 'missing.py:f'}", 3, "not found"),
    ("{fn: 'json:JSONDecoder'}", 3, "does not take `completions`"),
    ("{fn: exact_match, wieght: 2}", 3, "did you mean 'weight'"),
])
def test_bad_specs_are_refused_with_the_config_line(tmp_path, entry, line, expected):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"""\
            rewards:
              - {{fn: exact_match}}
              - {entry}
            """)
    message = str(caught.value)
    assert f"c.yaml:{line}" in message and expected in message, message


def test_user_function_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("import not_installed_pkg\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"c.yaml:2 .*running 'broken.py' failed: ModuleNotFoundError"):
        _load(tmp_path, "rewards:\n  - {fn: 'broken.py:f'}\n")


@pytest.mark.parametrize("body, expected", [
    ("return [1.0]", "returned 1 values for 2 completions"),
    ("return ['good'] * len(completions)", "value 0 is 'good' (str), expected a number or None"),
    ("return 1.0", "returned float, expected a list"),
    ("return [float('inf')] * len(completions)", "value 0 is infinite"),
    ("raise KeyError('answer')", "failed on a trial call with 2 rows of the training data (columns: answer): "
                                 "KeyError: 'answer'"),
])
def test_a_bad_result_at_the_first_call_names_the_config_line(tmp_path, monkeypatch, body, expected):
    (tmp_path / "mine.py").write_text(f"def bad(prompts, completions, **kw):\n    {body}\n")
    monkeypatch.chdir(tmp_path)
    config = _load(tmp_path, "rewards:\n  - {fn: exact_match}\n  - {fn: 'mine.py:bad', name: mine}\n")
    rewards = load_rewards(config.rewards)
    with pytest.raises(ConfigError) as caught:
        check_rewards(rewards, ["p", "q"], ["a", "b"], {"answer": ["a", "c"]})
    assert f"c.yaml:3 field 'fn': reward 'mine' (mine.py:bad) {expected}" in str(caught.value), caught.value


def test_a_missing_column_is_found_by_the_trial_call():
    rewards = load_rewards([RewardSpec(fn="ends_with", args={"column": "sign_off"})], where="grpo.yaml")
    with pytest.raises(ConfigError, match=r"reward 'ends_with' \(ends_with, grpo.yaml\).*no column 'sign_off'"):
        check_rewards(rewards, ["p"], ["a"], {"answer": ["a"]})


def test_duplicate_labels_are_refused():
    with pytest.raises(ConfigError, match="label 'contains' is used by entries 0 and 1"):
        load_rewards([RewardSpec(fn="contains", args={"text": "a"}), RewardSpec(fn="contains", args={"text": "b"})])
