"""SFT data (v4jax.sft): which tokens of a conversation carry the loss, against token lists built by
hand from the release's format (v4jax.chat's docstring) with the DeepSeek-V4 tokenizer."""

import json

import pytest

from v4jax.chat import ASSISTANT_ID, BOS_ID, END_THINK_ID, EOS_ID, THINK_ID, USER_ID
from v4jax.sft import encode_conversation, read_conversations
from v4jax.tokenizer import load_tokenizer


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
    for line, match in (("{not json", ":1: not JSON"), (json.dumps({"text": "x"}), ":1: .*'messages' list"),
                        (json.dumps({**good, "mode": "fast"}), ":1: 'mode' must be one of"),
                        (json.dumps({"messages": [{"role": "user", "content": "Hi"}]}), ":1: no assistant"),
                        (json.dumps({"messages": [{"role": "robot", "content": "Hi"}]}), ":1: .*role"),
                        ("", "no conversations")):
        path.write_text(line + "\n")
        with pytest.raises(ValueError, match=match):
            read_conversations(path)
    with pytest.raises(ValueError, match="mode must be one of"):
        read_conversations(path, mode="fast")


def _conversations(n):
    out = []
    for i in range(n):
        a, b = i + 2, 3 * i + 1
        out.append({"messages": [{"role": "user", "content": f"What is {a}+{b}? Answer with the number only."},
                                 {"role": "assistant", "content": str(a + b),
                                  "reasoning_content": f"{a} plus {b} makes {a + b}."}],
                    **({"mode": "think"} if i % 2 else {})})
    return out


@pytest.mark.parametrize("seq_len, hosts", [(512, 1), (24, 1), (512, 2)])
def test_chat_batches_count_only_the_reply_tokens(tmp_path, tok, seq_len, hosts):
    """``data.format: chat``: packed rows whose ``loss_mask`` is 1 exactly where the target is a token
    an assistant turn writes. With whole conversations in a row (seq_len 512) every segment is
    checked against ``encode_conversation``; cut into pieces (24) the counted targets still total
    the conversations' trained tokens (every next-token pair once per epoch). Over 2 hosts each
    conversation is read by exactly one, with its flags."""
    from v4jax.data import DataConfig, make_dataset

    convs = _conversations(7)
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    cfg = DataConfig(path=str(path), format="chat", seq_len=seq_len, batch_size=2, shuffle=False, num_epochs=1,
                     heldout_fraction=0.0)
    encoded = [encode_conversation(c["messages"], tok, c.get("mode", "chat")) for c in convs]
    counted, seen = 0, []
    for host in range(hosts):
        for batch in make_dataset(cfg, host, hosts):
            counted += int(batch["loss_mask"].sum())
            if seq_len < 512:
                continue
            for row in range(batch["tokens"].shape[0]):
                for s in set(batch["segment_ids"][row].tolist()) - {0}:
                    at = batch["segment_ids"][row] == s
                    tokens = batch["tokens"][row][at].tolist()
                    flags = next(f for t, f in encoded if t == tokens)  # a whole conversation
                    assert batch["loss_mask"][row][at].tolist() == [float(x) for x in flags[1:] + [False]]
                    assert batch["mtp_mask"][row][at].tolist() == [float(x) for x in flags[2:] + [False, False]]
                    seen.append((host, tuple(tokens)))
    assert counted == sum(sum(f[1:]) for _, f in encoded)
    if seq_len == 512:  # every conversation once, on one host
        assert sorted(t for _, t in seen) == sorted(tuple(t) for t, _ in encoded)
        assert len({h for h, _ in seen}) == hosts


def test_chat_format_settings_are_checked(tmp_path):
    from v4jax.config import ConfigError
    from v4jax.data import DataConfig, DataError, make_dataset

    with pytest.raises(ConfigError, match="data.format"):
        DataConfig(format="sft")
    with pytest.raises(ConfigError, match="data.chat_mode"):
        DataConfig(path="x.jsonl", format="chat", chat_mode="fast")
    with pytest.raises(ConfigError, match="tokenizer='deepseek'"):
        DataConfig(path="x.jsonl", format="chat", tokenizer="bytes")
    with pytest.raises(ConfigError, match="data.path"):
        DataConfig(format="chat")
    text = tmp_path / "a.txt"
    text.write_text("plain text")
    with pytest.raises(DataError, match="reads .jsonl files"):
        make_dataset(DataConfig(path=str(text), format="chat", heldout_fraction=0.0), 0, 1)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    with pytest.raises(DataError, match=":1: no assistant"):
        make_dataset(DataConfig(path=str(bad), format="chat", heldout_fraction=0.0), 0, 1)
