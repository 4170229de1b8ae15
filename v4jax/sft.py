"""Supervised fine-tuning data: conversations in the V4 chat format, the loss on what the model writes.

A conversation is ``{"messages": [...]}`` with ``v4jax.chat``'s roles (system, user, assistant; an
assistant message may carry ``reasoning_content``) and optionally ``"mode"`` (chat, think or
think_max; default: the caller's). ``encode_conversation`` renders it as training text
(``encode_chat_tokens`` with ``add_generation_prompt=False``) and flags each token: True on the
tokens an assistant turn writes (in the think modes its reasoning and ``</think>``, then its content
and EOS), False on the system and user turns and on the markers that open a reply, which the
prompt supplies.

A turn is trained where its rendering in the whole conversation is what the model writes after the
prompt before it: the tokens of the conversation up to that turn's opener, then the turn, must be
the conversation's own first tokens. So in chat mode every assistant turn is trained; in the think
modes with the release's ``drop_thinking``, only the turns after the last user message (earlier
ones are rendered without their reasoning after ``</think>``, which is not what the model wrote
after ``<think>``). A conversation with no trained turn is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from v4jax.chat import MODES, encode_chat_tokens, encode_messages
from v4jax.jsonl import json_lines


def encode_conversation(messages, tokenizer: Any, mode: str = "chat") -> tuple[list[int], list[bool]]:
    """-> (token ids of the conversation, a flag per token: True where the loss counts). Bad messages
    raise ``v4jax.chat``'s ``ValueError`` naming the message and field."""
    tokens = encode_chat_tokens(messages, tokenizer, mode, add_generation_prompt=False)
    trained = [False] * len(tokens)
    for j, msg in enumerate(messages):
        if msg.get("role") != "assistant" or j == 0 or messages[j - 1].get("role") != "user":
            continue  # (encode_chat_tokens has refused what the release would not render)
        prompt = encode_chat_tokens(messages[:j], tokenizer, mode, add_generation_prompt=True)
        whole = encode_chat_tokens(messages[:j + 1], tokenizer, mode, add_generation_prompt=False)
        if tokens[:len(whole)] == whole and whole[:len(prompt)] == prompt:
            trained[len(prompt):len(whole)] = [True] * (len(whole) - len(prompt))
    if not any(trained):
        raise ValueError(f"nothing to train on in mode {mode!r}: the conversation needs an assistant message "
                         "answering a user message (in the think modes, one after the last user message)")
    return tokens, trained


def read_conversations(path: str | Path, mode: str = "chat") -> list[dict[str, Any]]:
    """The conversations of a .jsonl file, one JSON object per line with ``messages`` (and optionally
    ``mode``), each checked by encoding its text layout (``v4jax.chat.encode_messages``); blank
    lines are skipped. A bad line raises ``ValueError`` naming the file, the line and the problem.
    -> [{"messages": [...], "mode": str}]."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = []
    for where, row in json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f"{where}: each line must be an object with a 'messages' list of "
                             "{'role': ..., 'content': ...}")
        row_mode = row.get("mode", mode)
        if row_mode not in MODES:
            raise ValueError(f"{where}: 'mode' must be one of {MODES}, got {row_mode!r}")
        try:
            encode_messages(row["messages"], row_mode, add_generation_prompt=False)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in row["messages"]):
            raise ValueError(f"{where}: no assistant message, so nothing to train on")
        out.append({"messages": row["messages"], "mode": row_mode})
    if not out:
        raise ValueError(f"{path}: no conversations (one JSON object with 'messages' per line)")
    return out
