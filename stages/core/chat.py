"""Chat templates, and an assistant-only loss mask that works for any of them.

Why this module exists: TRL's ``assistant_only_loss=True`` gets its mask from
``apply_chat_template(return_assistant_tokens_mask=True)``, which only works when the template wraps
assistant turns in ``{% generation %}`` ... ``{% endgeneration %}``. Almost no published template
does (Llama-3, Mistral, Gemma, Phi-3, Qwen and SmolLM2 do not), so lorelay locates the assistant
turns itself, from nothing but the template's own renderings:

1. render the whole conversation once; for every assistant message ``i`` render ``messages[:i]``
   with the generation prompt (where the reply starts) and ``messages[:i+1]`` (where it ends);
2. find the message's content inside that window: verbatim, or trimmed for templates that ``| trim``;
3. tokenize the whole rendering with character offsets and mark every token that overlaps the
   content, up to and including the first special token after it. That token is the end-of-turn
   marker (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``, ``<|end|>``): the model must
   learn to emit it, or it never learns to stop.

Decisions at the edges, fixed here so every template gets the same treatment:

- A token that straddles the start of the content is trained on. Mistral renders ``' ' + content``
  and BPE merges that space into the first word; leaving the token out would leave the first word
  of every reply untrained. Template whitespace that is a token of its own (that space before a
  digit, Zephyr's newline after ``<|assistant|>``) is not trained: it is not part of the reply.
- Whatever the template renders between the content and the end-of-turn token (tool calls, or a
  newline) is trained on: the model has to produce it before it can stop.
- Nothing after the end-of-turn token is (the newline before the next turn, a final EOS that some
  templates only add at the very end of a conversation, the next turn's header).
- If no special token follows the content (the template's end marker is ordinary text in this
  vocabulary, e.g. ChatML put on a base model that lacks ``<|im_end|>``), the mask runs to the end of
  the turn's own rendering, trailing whitespace excluded.
- A template that renders an earlier prefix differently from the whole conversation (reasoning
  templates drop past ``<think>`` blocks; some move the system prompt to the last user turn) has no
  one mask for the whole conversation: ``assistant_samples`` then trains each assistant
  turn on the conversation as the template renders it at that turn (or only the final turn). One
  whose generation prompt is not even a prefix of the turn it starts, or that does not render a
  reply's content, is refused with a ``LorelayError``: no mask would be right for it.

The ids are exactly ``tokenizer.apply_chat_template(messages, tools=tools)["input_ids"]`` (templates
write their own BOS, so the rendering is tokenized with ``add_special_tokens=False``).
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from stages.core.errors import LorelayError

logger = logging.getLogger(__name__)

Message = Mapping[str, Any]

# ChatML as SmolLM2 and Qwen write it, minus their default system prompts: a base model should not
# inherit another model's persona.
chatml_template = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TEMPLATE_HINT = "set model.chat_template to a Jinja template file that renders it"
# Rendered once to check that a template file works at all before any data goes through it.
_PROBE = ({"role": "user", "content": "lorelay probe question"},
          {"role": "assistant", "content": "lorelay probe answer"})


# ----------------------------------------------------------------------------------------------
# which template
# ----------------------------------------------------------------------------------------------

def ensure_chat_template(tokenizer, template_file: str | Path | None = None) -> str:
    """Give ``tokenizer`` the chat template to train with, and say where it came from.

    A template file wins over the tokenizer's own template; a tokenizer without one (a base model)
    gets ChatML. The template is set on ``tokenizer.chat_template``, so ``save_pretrained`` writes it
    next to the adapter and inference uses the format the model was trained on.
    Returns ``"file:PATH"``, ``"tokenizer"`` or ``"chatml-default"``.
    """
    if template_file is not None:
        path = Path(template_file)
        tokenizer.chat_template = _read_template_file(tokenizer, path)
        return f"file:{path}"
    if tokenizer.chat_template:
        return "tokenizer"
    _warn_if_split(tokenizer, ("<|im_start|>", "<|im_end|>"))
    tokenizer.chat_template = chatml_template
    return "chatml-default"


def _read_template_file(tokenizer, path: Path) -> str:
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorelayError("chat template file not found", file=path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise LorelayError(f"cannot read the chat template file: {err}", file=path) from None
    if not source.strip():
        raise LorelayError("chat template file is empty", file=path)
    # Render a one-question conversation now, so a broken file fails here, naming the file,
    # rather than on the first training row.
    try:
        text = tokenizer.apply_chat_template(list(_PROBE), chat_template=source, tokenize=False)
    except jinja2.TemplateSyntaxError as err:
        raise LorelayError(f"chat template syntax error: {err.message}", file=path, line=err.lineno) from None
    except (jinja2.TemplateError, TypeError, ValueError) as err:
        raise LorelayError(f"chat template fails on a one-question conversation: {err}", file=path) from None
    if any(message["content"] not in text for message in _PROBE):
        raise LorelayError("chat template does not render the messages' content", file=path,
                           hint="it must output message['content'] for user and assistant messages")
    return source


def _warn_if_split(tokenizer, markers: Sequence[str]) -> None:
    # Adding the markers as tokens would resize the embeddings, which is the model loader's call;
    # as text they still work (the mask then covers '<|im_end|>' as several tokens).
    split = [m for m in markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        logger.warning("ChatML markers %s are not single tokens of this tokenizer; they will be learned as text",
                       ", ".join(split))


def _template_source(tokenizer, *, tools: bool = False) -> str:
    try:
        # Tokenizers may hold several named templates; this picks the one apply_chat_template uses.
        return tokenizer.get_chat_template(None, [] if tools else None)
    except ValueError as err:
        # Either no template at all, or several named ones and none called "default".
        reason = "has no chat template" if tokenizer.chat_template is None else f"has no usable chat template: {err}"
        raise LorelayError(f"the tokenizer {reason}", hint="call stages.core.chat.ensure_chat_template first") from None


# ----------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------

def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template mentions tools at all; one that never does cannot render them."""
    return _mentions_tools(_template_source(tokenizer, tools=True))


@functools.lru_cache(maxsize=64)
def _mentions_tools(source: str) -> bool:
    return re.search(r"\btools?\b|tool_calls", source) is not None


def _uses_tools(messages: Sequence[Message], tools: Sequence[Any] | None) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def _check_tools_supported(tokenizer, messages: Sequence[Message], tools: Sequence[Any] | None) -> None:
    if _uses_tools(messages, tools) and not template_supports_tools(tokenizer):
        raise LorelayError("this conversation has tool calls, tool results or tool definitions, but the chat "
                           "template cannot render tools (it never mentions them)",
                           hint=f"drop the tool messages, or {_TEMPLATE_HINT} (e.g. Qwen2.5's)")


def _check_tools_rendered(text: str, messages: Sequence[Message], tools: Sequence[Any] | None) -> None:
    # A template that mentions tools may still silently drop some of them (say, tool results);
    # training on such a rendering would teach replies to results the model never saw.
    for index, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            name = _tool_name(call)
            if name and name not in text:
                raise LorelayError(f"message {index}: the chat template drops the call to tool '{name}'",
                                   hint=_TEMPLATE_HINT)
        content = message.get("content")
        if message.get("role") == "tool" and isinstance(content, str) and content.strip() not in text:
            raise LorelayError(f"message {index}: the chat template drops this tool result", hint=_TEMPLATE_HINT)
    for tool in tools or ():
        name = _tool_name(tool)
        if name and name not in text:
            raise LorelayError(f"the chat template drops the definition of tool '{name}'", hint=_TEMPLATE_HINT)


def _tool_name(entry: Any) -> str | None:
    # OpenAI form {"type": "function", "function": {"name": ...}}, or the bare {"name": ...}.
    if not isinstance(entry, Mapping):
        return getattr(entry, "__name__", None)
    function = entry.get("function", entry)
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) else None


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------

def render_prompt(tokenizer, messages: Sequence[Message], tools: Sequence[Any] | None = None) -> str:
    """The conversation rendered with the generation prompt, ready for ``generate``."""
    messages = list(messages)
    _template_source(tokenizer, tools=bool(tools))
    _check_tools_supported(tokenizer, messages, tools)
    text = _render(tokenizer, messages, tools=tools, generation_prompt=True)
    _check_tools_rendered(text, messages, tools)
    return text


def _render(tokenizer, messages: list[Message], *, tools: Sequence[Any] | None, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                             tokenize=False)
    except (jinja2.TemplateError, TypeError, ValueError) as err:
        # Templates reject conversations themselves (roles must alternate, no system role, ...).
        raise LorelayError(f"the chat template refuses this conversation: {err}") from None


# ----------------------------------------------------------------------------------------------
# assistant-only mask
# ----------------------------------------------------------------------------------------------

HISTORY_MODES = ("per_turn", "final_turn")


class HistoryRewritten(LorelayError):
    """The template renders earlier turns differently once later turns follow."""


def assistant_mask(tokenizer, messages: Sequence[Message], *,
                   tools: Sequence[Any] | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, mask)`` of a conversation: mask 1 on each assistant reply and its end-of-turn token.

    ``input_ids`` equal ``tokenizer.apply_chat_template(messages, tools=tools)["input_ids"]``.
    Raises ``LorelayError`` for a conversation without an assistant reply after a prompt, for tools
    the template cannot render, and for templates whose turns cannot be located (see module doc);
    ``HistoryRewritten`` when the template renders earlier turns differently as the conversation grows.
    """
    messages = list(messages)
    turns = _assistant_turns(messages)
    _template_source(tokenizer, tools=bool(tools))
    _check_tools_supported(tokenizer, messages, tools)
    return _masked(tokenizer, messages, turns, tools)


def assistant_samples(tokenizer, messages: Sequence[Message], *, tools: Sequence[Any] | None = None,
                      history: str = "per_turn") -> tuple[list[tuple[list[int], list[int]]], bool]:
    """The ``(input_ids, mask)`` samples a conversation trains as, and whether its history was rewritten.

    A template that renders every prefix of the conversation as the start of the whole gives one
    sample with all assistant turns masked. One that rewrites earlier turns as the conversation grows
    (reasoning templates drop past ``<think>`` blocks) cannot be trained in one sequence: the model would learn replies after a history
    it never sees at inference. Then ``history="per_turn"`` gives one sample per assistant turn, the
    conversation up to that turn rendered as the template renders it there, only that turn masked;
    ``"final_turn"`` gives only the final assistant turn's sample.
    """
    if history not in HISTORY_MODES:
        raise LorelayError(f"unknown history mode {history!r}; expected one of {', '.join(HISTORY_MODES)}")
    messages = list(messages)
    try:
        return [assistant_mask(tokenizer, messages, tools=tools)], False
    except HistoryRewritten:
        turns = _assistant_turns(messages)
    chosen = turns if history == "per_turn" else turns[-1:]
    return [_masked(tokenizer, messages[:index + 1], [index], tools, per_turn=True) for index in chosen], True


def _masked(tokenizer, messages: list[Message], turns: list[int], tools: Sequence[Any] | None, *,
            per_turn: bool = False) -> tuple[list[int], list[int]]:
    """The whole rendering of ``messages`` tokenized, with the assistant ``turns`` masked."""
    full = _render(tokenizer, messages, tools=tools, generation_prompt=False)
    _check_tools_rendered(full, messages, tools)

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = [tuple(pair) for pair in encoding["offset_mapping"]]
    ends = [token_end for _, token_end in offsets]
    special = _special_ids(tokenizer)
    mask = [0] * len(ids)
    for index in turns:
        start, end = _turn_window(tokenizer, messages, index, full, tools, per_turn=per_turn)
        content_start, content_end = _content_span(full, start, end, messages[index], index)
        span_end = _end_of_turn(full, ids, offsets, special, content_end, start, end)
        _mark(mask, offsets, ends, content_start, span_end)
    return ids, mask


def _assistant_turns(messages: list[Message]) -> list[int]:
    turns = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    if not turns:
        raise LorelayError("the conversation has no assistant message to train on")
    if turns[0] == 0:
        raise LorelayError("the conversation starts with an assistant message, so it has no prompt",
                           hint="start it with a user (or system) message")
    return turns


def _turn_window(tokenizer, messages: list[Message], index: int, full: str,
                 tools: Sequence[Any] | None, *, per_turn: bool = False) -> tuple[int, int]:
    """Character range of assistant turn ``index`` in ``full``, from after its generation prompt."""
    prompt = _render(tokenizer, messages[:index], tools=tools, generation_prompt=True)
    if not full.startswith(prompt):
        raise _not_a_prefix(prompt, full, index, per_turn=per_turn)
    # The last turn's own rendering is the whole one: rendering it again would cost a third of the mask.
    through = full if index + 1 == len(messages) else _render(tokenizer, messages[:index + 1], tools=tools,
                                                             generation_prompt=False)
    # Some templates close the conversation with extra text (Phi-3 appends EOS when there is no
    # generation prompt), so the turn ends where this rendering stops agreeing with the whole one.
    end = len(through) if full.startswith(through) else _common_prefix(through, full)
    content = messages[index].get("content")
    content = content.strip() if isinstance(content, str) else ""
    if not per_turn and content and content in through[len(prompt):] and content not in full[len(prompt):end]:
        raise HistoryRewritten(f"the chat template renders assistant turn {index} differently once later turns "
                               "follow (e.g. it drops its <think> block)")
    return len(prompt), end


def _not_a_prefix(prompt: str, full: str, index: int, *, per_turn: bool) -> LorelayError:
    at = _common_prefix(prompt, full)
    differs = (f"the chat template renders messages[:{index}] differently on their own than inside "
               f"{'messages[:' + str(index + 1) + ']' if per_turn else 'the whole conversation'} (at character "
               f"{at}: {prompt[at:at + 40]!r} vs {full[at:at + 40]!r})")
    if not per_turn:
        return HistoryRewritten(differs)
    return LorelayError(f"{differs}, so assistant turn {index} cannot be located even on its own",
                        hint="set model.chat_template to a template file whose generation prompt starts "
                             "the reply's rendering")


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _content_span(full: str, start: int, end: int, message: Message, index: int) -> tuple[int, int]:
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise LorelayError(f"message {index}: assistant content must be a string, got {type(content).__name__}")
    # Verbatim first; trimmed for templates that `| trim` (Llama-3, Gemma, Mistral v0.3).
    for candidate in (content, content.strip()):
        if candidate:
            position = full.find(candidate, start, end)
            if position >= 0:
                return position, position + len(candidate)
    if content.strip():
        raise LorelayError(f"message {index}: the chat template does not render this assistant reply "
                           "verbatim, so its tokens cannot be located", hint=_TEMPLATE_HINT)
    # No content (a pure tool call): the reply is whatever the turn renders after the prompt.
    window = full[start:end]
    position = start + len(window) - len(window.lstrip())
    return position, position


def _special_ids(tokenizer) -> frozenset[int]:
    # Recomputed per call (microseconds): special tokens can be added to a tokenizer at any time.
    ids = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(ids.union(tokenizer.all_special_ids))


def _end_of_turn(full: str, ids: list[int], offsets: list[tuple[int, int]], special: frozenset[int],
                 content_end: int, start: int, end: int) -> int:
    """Character offset where the trained span stops: after the first special token past the content."""
    first = bisect.bisect_left(offsets, (content_end, content_end))
    for position in range(first, len(ids)):
        token_start, token_end = offsets[position]
        if token_start >= end:
            break
        if ids[position] in special:
            return token_end
    # The end marker is plain text in this vocabulary: train on the turn's own text.
    return max(content_end, start + len(full[start:end].rstrip()))


def _mark(mask: list[int], offsets: list[tuple[int, int]], ends: list[int], span_start: int, span_end: int) -> None:
    # Every token overlapping [span_start, span_end): this is what trains a straddling first token.
    position = bisect.bisect_right(ends, span_start)
    while position < len(offsets) and offsets[position][0] < span_end:
        if offsets[position][1] > span_start:
            mask[position] = 1
        position += 1
