"""SFT data (v4jax.sft): which tokens of a conversation carry the loss, against token lists built by
hand from the release's format (v4jax.chat's docstring) with the DeepSeek-V4 tokenizer."""

import json

import pytest

from v4jax.chat import ASSISTANT_ID, BOS_ID, END_THINK_ID, EOS_ID, THINK_ID, USER_ID
from v4jax.data import load_tokenizer
from v4jax.sft import encode_conversation, read_conversations


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("deepseek")


def _flagged(tok, *parts):
    """Tokens and flags from (text or marker id, trained) parts."""
    tokens, flags = [], []
    for value, trained in parts:
        ids = [value] if isinstance(value, int) else list(tok.encode(value))
        tokens += ids
        flags += [trained] * len(ids)
    return tokens, flags


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3 is 5."},
                {"role": "user", "content": "And 4+4?"},
                {"role": "assistant", "content": "8", "reasoning_content": "4 and 4 make 8."}]


def test_chat_mode_trains_every_reply(tok):
    want = _flagged(tok, (BOS_ID, False), ("Be brief.", False), (USER_ID, False), ("What is 2+3?", False),
                    (ASSISTANT_ID, False), (END_THINK_ID, False), ("5", True), (EOS_ID, True),
                    (USER_ID, False), ("And 4+4?", False), (ASSISTANT_ID, False), (END_THINK_ID, False),
                    ("8", True), (EOS_ID, True))
    assert encode_conversation(CONVERSATION, tok, "chat") == want


def test_think_mode_trains_the_last_reply_with_its_reasoning(tok):
    """The first reply is rendered without its reasoning after </think> (the release drops earlier
    reasoning), which is not what the model wrote after <think>: not trained. The last is, from its
    reasoning through EOS."""
    want = _flagged(tok, (BOS_ID, False), ("Be brief.", False), (USER_ID, False), ("What is 2+3?", False),
                    (ASSISTANT_ID, False), (END_THINK_ID, False), ("5", False), (EOS_ID, False),
                    (USER_ID, False), ("And 4+4?", False), (ASSISTANT_ID, False), (THINK_ID, False),
                    ("4 and 4 make 8.", True), (END_THINK_ID, True), ("8", True), (EOS_ID, True))
    assert encode_conversation(CONVERSATION, tok, "think") == want


def test_nothing_to_train_is_refused(tok):
    with pytest.raises(ValueError, match="nothing to train on"):
        encode_conversation([{"role": "user", "content": "Hi"}], tok, "chat")
    with pytest.raises(ValueError, match="messages"):
        encode_conversation([{"role": "assistant", "content": "x", "bogus": 1}], tok, "chat")


def test_read_conversations(tmp_path):
    good = {"messages": CONVERSATION[1:3]}
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "mode": "think"}) + "\n")
    assert read_conversations(path) == [{**good, "mode": "chat"}, {**good, "mode": "think"}]
    for line, match in (("{not json", "line 1: not JSON"), (json.dumps({"text": "x"}), "line 1: .*'messages' list"),
                        (json.dumps({**good, "mode": "fast"}), "line 1: 'mode' must be one of"),
                        (json.dumps({"messages": [{"role": "user", "content": "Hi"}]}), "line 1: no assistant"),
                        (json.dumps({"messages": [{"role": "robot", "content": "Hi"}]}), "line 1: .*role"),
                        ("", "no conversations")):
        path.write_text(line + "\n")
        with pytest.raises(ValueError, match=match):
            read_conversations(path)
    with pytest.raises(ValueError, match="mode must be one of"):
        read_conversations(path, mode="fast")
