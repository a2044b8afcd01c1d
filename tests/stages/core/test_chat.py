"""stages.core.chat: assistant-only masks that are exact for the common template families, without
``{% generation %}`` markers; template fallback and override; tool-call checks; text completions.

Each family's template copies the logic of the real one (Llama-3-8B-Instruct, Mistral-7B-Instruct
v0.1/v0.2, Gemma-3, Phi-3-mini, Zephyr-7b-beta, Qwen2.5) and is put on a copy of the SmolLM2
tokenizer, with the family's control tokens added as special tokens, as they are in the real
tokenizers, so each end-of-turn marker is one token.
"""

from __future__ import annotations

import copy

import pytest

from stages.core.chat import (assistant_mask, chatml_template, ensure_chat_template, render_prompt,
                              template_supports_tools)
from stages.core.data import text_completion_tokens
from stages.core.errors import LorelayError

# ----------------------------------------------------------------------------------------------
# templates
# ----------------------------------------------------------------------------------------------

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct v0.1/v0.2 (updated): the system prompt goes into the first user turn.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Mistral-7B-Instruct v0.3 puts the system prompt into the *last* user turn, so a conversation's
# prefix renders differently on its own: no mask can be derived from it.
MISTRAL_V3_SYSTEM_LAST = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- endif %}
{%- endfor %}
"""

# Gemma-3 (text only): system prompt prepended to the first user turn, assistant role is "model".
GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Gemma-2: no system role at all.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Phi-3-mini: note the EOS appended only when there is no generation prompt.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
    "{% endif %}"
)

# Zephyr-7b-beta: the role headers are plain text in its vocabulary, turns end with EOS.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Qwen2.5 with tools, cut down to the parts that render tools, tool calls and tool results.
QWEN_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# family: (template, special tokens to add, how one assistant reply appears in the mask)
FAMILIES = {
    "chatml": (None, {}, lambda reply: reply + "<|im_end|>"),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                        "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]},
               lambda reply: reply.strip() + "<|eot_id|>"),
    # The template's ' ' before the reply merges into the reply's first token, which is trained.
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]"]},
                lambda reply: " " + reply + "</s>"),
    "gemma": (GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>",
                      "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
              lambda reply: reply.strip() + "<end_of_turn>"),
    "phi3": (PHI3, {"eos_token": "<|endoftext|>",
                    "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]},
             lambda reply: reply + "<|end|>"),
    "zephyr": (ZEPHYR, {"bos_token": "<s>", "eos_token": "</s>"}, lambda reply: reply + "</s>"),
}

SINGLE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
MULTI = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime. "},  # trailing space: trimmed by some templates
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two is both even and prime."},
]
SYSTEM = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say yes."},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "Say no."},
    {"role": "assistant", "content": "No."},
]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system": SYSTEM}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 24C"},
    {"role": "assistant", "content": "It is sunny and 24C in Paris."},
]


def with_template(tokenizer, template: str | None, special: dict | None = None):
    """A copy of ``tokenizer`` with another chat template (and its control tokens)."""
    clone = copy.deepcopy(tokenizer)
    if special:
        clone.add_special_tokens(special)
    clone.chat_template = template
    return clone


@pytest.fixture(scope="module")
def family_tokenizers(tokenizer):
    return {name: tokenizer if template is None else with_template(tokenizer, template, special)
            for name, (template, special, _) in FAMILIES.items()}


def masked_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded text of each contiguous run of masked tokens."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs]


# ----------------------------------------------------------------------------------------------
# assistant_mask, family by family
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_is_exactly_the_replies_and_their_end_of_turn_tokens(family_tokenizers, family, conversation):
    tok = family_tokenizers[family]
    messages = CONVERSATIONS[conversation]
    ids, mask = assistant_mask(tok, messages)

    assert ids == tok.apply_chat_template(messages)["input_ids"]
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    reply_text = FAMILIES[family][2]
    expected = [reply_text(m["content"]) for m in messages if m["role"] == "assistant"]
    assert masked_runs(tok, ids, mask) == expected


def test_mask_positions_by_construction_chatml(tokenizer):
    prompt_ids = tokenizer(render_prompt(tokenizer, SINGLE[:1]), add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(SINGLE[1]["content"], add_special_tokens=False)["input_ids"]
    end_of_turn, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n")["input_ids"]

    ids, mask = assistant_mask(tokenizer, SINGLE)

    assert ids == prompt_ids + reply_ids + [end_of_turn] + newline
    assert mask == [0] * len(prompt_ids) + [1] * (len(reply_ids) + 1) + [0] * len(newline)


def test_mask_positions_by_construction_llama3_bos_not_doubled(family_tokenizers):
    tok = family_tokenizers["llama3"]
    ids, mask = assistant_mask(tok, SINGLE)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    reply_ids = tok(SINGLE[1]["content"], add_special_tokens=False)["input_ids"]

    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[-len(reply_ids) - 1:] == reply_ids + [tok.convert_tokens_to_ids("<|eot_id|>")]
    assert mask == [0] * (len(ids) - len(reply_ids) - 1) + [1] * (len(reply_ids) + 1)


def test_template_space_is_trained_only_inside_the_first_token(family_tokenizers):
    # Mistral renders ' ' + reply. " Seven" is one token, which carries the reply's first word and
    # is trained; before a digit the space is a token of its own, belongs to the template, and is not.
    tok = family_tokenizers["mistral"]
    for reply, expected in ((" Seven.", " Seven.</s>"), ("7.", "7.</s>")):
        messages = [SINGLE[0], {"role": "assistant", "content": reply.strip()}]
        ids, mask = assistant_mask(tok, messages)
        assert masked_runs(tok, ids, mask) == [expected]


def test_phi3_final_eos_is_not_trained(family_tokenizers):
    tok = family_tokenizers["phi3"]
    ids, mask = assistant_mask(tok, SINGLE)
    assert tok.convert_ids_to_tokens(ids[-3:]) == ["<|end|>", "Ċ", "<|endoftext|>"]
    assert mask[-3:] == [1, 0, 0]


# ----------------------------------------------------------------------------------------------
# templates that cannot be mapped, and conversations that cannot be trained on
# ----------------------------------------------------------------------------------------------

def test_prefix_rendered_differently_is_refused(tokenizer):
    tok = with_template(tokenizer, MISTRAL_V3_SYSTEM_LAST, {"bos_token": "<s>", "eos_token": "</s>"})
    assistant_mask(tok, SINGLE)  # without a system prompt the template is prefix-stable
    with pytest.raises(LorelayError, match=r"renders messages\[:2\] differently"):
        assistant_mask(tok, SYSTEM)


def test_reply_not_rendered_verbatim_is_refused(tokenizer):
    shouting = chatml_template.replace("message['content']", "message['content'] | upper")
    with pytest.raises(LorelayError, match="does not render this assistant reply verbatim"):
        assistant_mask(with_template(tokenizer, shouting), SINGLE)


def test_template_exception_becomes_lorelay_error(tokenizer):
    tok = with_template(tokenizer, GEMMA2, {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    with pytest.raises(LorelayError, match="refuses this conversation: System role not supported"):
        assistant_mask(tok, SYSTEM)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "Hi"}], "no assistant message"),
    ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}], "starts with an assistant"),
])
def test_conversation_without_a_prompted_reply_is_refused(tokenizer, messages, message):
    with pytest.raises(LorelayError, match=message):
        assistant_mask(tokenizer, messages)


# ----------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------

def test_tool_calls_are_trained_and_tool_results_are_not(tokenizer):
    tok = with_template(tokenizer, QWEN_TOOLS)
    assert template_supports_tools(tok)

    ids, mask = assistant_mask(tok, TOOL_CHAT, tools=[WEATHER_TOOL])

    assert ids == tok.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL])["input_ids"]
    assert masked_runs(tok, ids, mask) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is sunny and 24C in Paris.<|im_end|>",
    ]
    assert '"description": "Current weather in a city"' in render_prompt(tok, TOOL_CHAT[:3], tools=[WEATHER_TOOL])


def test_tools_refused_by_a_template_without_them(tokenizer):
    assert not template_supports_tools(tokenizer)
    with pytest.raises(LorelayError, match="cannot render tools") as caught:
        assistant_mask(tokenizer, TOOL_CHAT)
    assert "model.chat_template" in str(caught.value)
    with pytest.raises(LorelayError, match="cannot render tools"):
        assistant_mask(tokenizer, SINGLE, tools=[WEATHER_TOOL])


def test_tool_call_dropped_by_the_template_is_refused(tokenizer):
    # Mentions tools, but renders neither the call nor the definitions.
    tok = with_template(tokenizer, chatml_template + "{% if tools %}{% endif %}")
    with pytest.raises(LorelayError, match="message 1: the chat template drops the call to tool 'get_weather'"):
        assistant_mask(tok, TOOL_CHAT, tools=[WEATHER_TOOL])


# ----------------------------------------------------------------------------------------------
# ensure_chat_template
# ----------------------------------------------------------------------------------------------

def test_own_template_is_kept(tokenizer):
    tok = copy.deepcopy(tokenizer)
    assert ensure_chat_template(tok) == "tokenizer"
    assert tok.chat_template == tokenizer.chat_template


def test_base_model_gets_chatml_saved_with_the_tokenizer(tokenizer, tmp_path):
    tok = with_template(tokenizer, None)

    assert ensure_chat_template(tok) == "chatml-default"
    assert tok.chat_template == chatml_template
    ids, mask = assistant_mask(tok, SYSTEM)
    assert render_prompt(tok, SYSTEM[:2]) == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                                              "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n")
    assert masked_runs(tok, ids, mask) == ["Yes.<|im_end|>", "No.<|im_end|>"]
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == chatml_template


def test_template_file_overrides_the_tokenizer(tokenizer, tmp_path):
    path = tmp_path / "zephyr.jinja"
    path.write_text(ZEPHYR, encoding="utf-8")
    tok = copy.deepcopy(tokenizer)

    assert ensure_chat_template(tok, path) == f"file:{path}"
    assert tok.chat_template == ZEPHYR
    ids, mask = assistant_mask(tok, SINGLE)
    # SmolLM2's EOS is <|im_end|>, so that is what closes a Zephyr turn here.
    assert masked_runs(tok, ids, mask) == ["The capital of France is Paris.<|im_end|>"]


@pytest.mark.parametrize("text, message", [
    (None, "chat template file not found"),
    ("", "chat template file is empty"),
    ("{% for message in messages %}\n{{ message['content'] }}\n", "chat template syntax error"),
    ("{{ messages[0]['content'] | no_such_filter }}", "chat template syntax error"),
    ("{{ raise_exception('nope') }}", "fails on a one-question conversation: nope"),
    ("Hello", "does not render the messages' content"),
])
def test_bad_template_file_is_named(tokenizer, tmp_path, text, message):
    path = tmp_path / "broken.jinja"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    tok = copy.deepcopy(tokenizer)
    with pytest.raises(LorelayError, match=message) as caught:
        ensure_chat_template(tok, path)
    assert caught.value.file == str(path)
    assert tok.chat_template == tokenizer.chat_template


# ----------------------------------------------------------------------------------------------
# plain text
# ----------------------------------------------------------------------------------------------

def test_text_completion_trains_on_completion_and_eos(tokenizer):
    prompt, completion = "Question: what is 2+2?\nAnswer:", " 4, of course."
    ids, mask = text_completion_tokens(tokenizer, prompt, completion)

    prompt_ids = tokenizer(prompt)["input_ids"]
    assert ids == tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[:len(prompt_ids)] == prompt_ids
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert masked_runs(tokenizer, ids, mask) == [completion + tokenizer.eos_token]


def test_text_completion_does_not_double_a_final_eos(tokenizer):
    ids, mask = text_completion_tokens(tokenizer, "Say bye:", " bye<|im_end|>")
    assert ids.count(tokenizer.eos_token_id) == 1 and mask[-1] == 1
