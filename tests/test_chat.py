"""Chat encoding: the release's format in each mode, multi-turn reasoning, the think-max preamble, token ids
through the real DeepSeek-V4 tokenizer, completions parsed back, and refused inputs.

The expected strings are written out by hand from the rules of the release's ``encoding/encoding_dsv4.py``
(DeepSeek-V4-Flash/-Pro), not produced by ``v4jax.chat``.
"""

import pytest

from v4jax import chat as C
from v4jax import tokenizer as T

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

# The release's REASONING_EFFORT_MAX, typed out again here so that the module's constant is checked
# against a second copy, not against itself.
PREAMBLE = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
            "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
            "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
            "adversarial scenarios.\n"
            "Explicitly write out your entire deliberation process, documenting every intermediate step, "
            "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
            "unchecked.\n\n")


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer("deepseek")


def user(text):
    return {"role": "user", "content": text}


def assistant(text, reasoning=None):
    msg = {"role": "assistant", "content": text}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return msg


SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATION = [SYSTEM, user("2+2?"), assistant("4", "Add them."), user("And 3+3?")]


# --------------------------------------------------------------------------------------------------
# Rendering


def test_single_turn_in_each_mode():
    msgs = [user("Hi")]
    assert C.encode_messages(msgs) == f"{BOS}{U}Hi{A}</think>"
    assert C.encode_messages(msgs, "chat") == f"{BOS}{U}Hi{A}</think>"
    assert C.encode_messages(msgs, "think") == f"{BOS}{U}Hi{A}<think>"
    assert C.encode_messages(msgs, "think_max") == f"{BOS}{PREAMBLE}{U}Hi{A}<think>"


def test_system_prompt_is_bare_text_after_bos():
    assert C.encode_messages([SYSTEM, user("Hi")]) == f"{BOS}You are terse.{U}Hi{A}</think>"
    assert C.encode_messages([SYSTEM, user("Hi")], "think") == f"{BOS}You are terse.{U}Hi{A}<think>"


def test_think_max_preamble_after_bos_before_the_system_prompt_once():
    assert C.REASONING_EFFORT_MAX == PREAMBLE
    assert C.encode_messages(CONVERSATION, "think_max") == (
        f"{BOS}{PREAMBLE}You are terse.{U}2+2?{A}</think>4{EOS}{U}And 3+3?{A}<think>")


def test_multi_turn_think_drops_earlier_reasoning():
    assert C.encode_messages(CONVERSATION, "think") == (
        f"{BOS}You are terse.{U}2+2?{A}</think>4{EOS}{U}And 3+3?{A}<think>")


def test_multi_turn_think_keeps_reasoning_without_drop_thinking():
    assert C.encode_messages(CONVERSATION, "think", drop_thinking=False) == (
        f"{BOS}You are terse.{U}2+2?{A}<think>Add them.</think>4{EOS}{U}And 3+3?{A}<think>")


def test_multi_turn_chat_never_renders_reasoning():
    want = f"{BOS}You are terse.{U}2+2?{A}</think>4{EOS}{U}And 3+3?{A}</think>"
    assert C.encode_messages(CONVERSATION, "chat") == want
    assert C.encode_messages(CONVERSATION, "chat", drop_thinking=False) == want


def test_finished_conversation_keeps_the_last_reply_reasoning():
    msgs = CONVERSATION + [assistant("6", "Three and three.")]
    assert C.encode_messages(msgs, "think", add_generation_prompt=False) == (
        f"{BOS}You are terse.{U}2+2?{A}</think>4{EOS}{U}And 3+3?{A}<think>Three and three.</think>6{EOS}")
    assert C.encode_messages(msgs, "chat", add_generation_prompt=False) == (
        f"{BOS}You are terse.{U}2+2?{A}</think>4{EOS}{U}And 3+3?{A}</think>6{EOS}")
    # A think-mode reply without reasoning still closes an empty think block.
    assert C.encode_messages([user("q"), assistant("a")], "think", add_generation_prompt=False) == (
        f"{BOS}{U}q{A}<think></think>a{EOS}")


def test_final_user_without_generation_prompt_gets_no_opener():
    assert C.encode_messages([user("q")], "think", add_generation_prompt=False) == f"{BOS}{U}q"


def test_consecutive_user_messages_are_one_turn():
    # The release merges them into one user message whose text blocks are joined by a blank line.
    assert C.encode_messages([user("first"), user("second")]) == f"{BOS}{U}first\n\nsecond{A}</think>"


def test_release_fixture_2_multi_turn_drop_thinking():
    # Release fixture encoding/tests/test_input_2.json -> test_output_2.txt (DeepSeek-V4-Flash, MIT),
    # rendered with thinking_mode="thinking". Read from vllm-project/vllm
    # tests/tokenizers_/fixtures/deepseek_v4/test_input_2.json (where vLLM renames reasoning_content to
    # "reasoning"); the output as quoted verbatim by two public ports of the encoder.
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "reasoning_content": "The user said hello, I should greet back.",
         "content": "Hi there! How can I help you?"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "reasoning_content": "The user asks about the capital of France. It is Paris.",
         "content": "The capital of France is Paris."},
    ]
    expected = ("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>Hi there! "
                "How can I help you?<｜end▁of▁sentence｜><｜User｜>What is the capital of France?<｜Assistant｜><think>"
                "The user asks about the capital of France. It is Paris.</think>The capital of France is Paris."
                "<｜end▁of▁sentence｜>")
    assert C.encode_messages(messages, "think", add_generation_prompt=False) == expected


def test_which_modes_extend_the_previous_prompt():
    turn1 = [SYSTEM, user("2+2?")]
    reply = assistant("4", "Add them.")
    turn2 = turn1 + [reply, user("And 3+3?")]
    completion = {"chat": "4" + EOS, "think": "Add them.</think>4" + EOS}
    # Chat mode: prompt + completion is a prefix of the next prompt (append the generated ids).
    assert C.encode_messages(turn2, "chat").startswith(C.encode_messages(turn1, "chat") + completion["chat"])
    # Think mode drops the reasoning it was generated with: re-prefill.
    assert not C.encode_messages(turn2, "think").startswith(C.encode_messages(turn1, "think"))
    # ... unless reasoning is kept.
    prev = C.encode_messages(turn1, "think", drop_thinking=False) + completion["think"]
    assert C.encode_messages(turn2, "think", drop_thinking=False).startswith(prev)


# --------------------------------------------------------------------------------------------------
# Token ids


def test_marker_ids_match_the_tokenizer(tok):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(T._packaged_tokenizer_json()))
    for marker, want in C.MARKER_IDS.items():
        assert raw.token_to_id(marker) == want, marker
    assert (C.BOS_ID, C.EOS_ID, C.PAD_ID) == (T.BOS_ID, T.EOS_ID, T.PAD_ID) == (0, 1, 2)
    assert (C.USER_ID, C.ASSISTANT_ID, C.THINK_ID, C.END_THINK_ID) == (128803, 128804, 128821, 128822)


def test_note_example_encodes_to_its_ids(tok):
    msgs = [user("hello"), assistant("Hi")]
    assert C.encode_messages(msgs, add_generation_prompt=False) == f"{BOS}{U}hello{A}</think>Hi{EOS}"
    assert C.encode_chat_tokens(msgs, tok, add_generation_prompt=False) == [0, 128803, 33310, 128804, 128822, 23166,
                                                                             1]


def test_chat_tokens_equal_one_pass_with_special_tokens_matched(tok):
    # The repo's tokenizer encodes BOS/EOS strings as text on purpose; a raw `tokenizers` pass that matches
    # them shows that putting markers in by id changes nothing else.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(T._packaged_tokenizer_json()))
    msgs = CONVERSATION + [assistant(" Six, i.e. 6 — \n done.", "Three\nand three 'quoted'.")]
    for mode in C.MODES:
        text = C.encode_messages(msgs, mode, add_generation_prompt=False, drop_thinking=False)
        ids = C.encode_chat_tokens(msgs, tok, mode, add_generation_prompt=False, drop_thinking=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert all(type(i) is int for i in ids)
    ids = C.encode_chat_tokens(CONVERSATION, tok, "think")
    assert ids[0] == C.BOS_ID and ids[-2:] == [C.ASSISTANT_ID, C.THINK_ID]
    assert ids.count(C.EOS_ID) == 1 and C.END_THINK_ID in ids


def test_chat_tokens_refuse_another_vocabulary():
    with pytest.raises(ValueError, match=r"needs the DeepSeek-V4 tokenizer"):
        C.encode_chat_tokens([user("hi")], T.load_tokenizer("bytes"))


# --------------------------------------------------------------------------------------------------
# Completions


@pytest.mark.parametrize("mode", C.MODES)
@pytest.mark.parametrize("reasoning", ["", "Step 1.\nStep 2."])
def test_parse_completion_inverts_the_rendered_reply(mode, reasoning):
    reply = assistant("The answer\n\nis 6.", reasoning)
    prompt = C.encode_messages(CONVERSATION, mode)
    full = C.encode_messages(CONVERSATION + [reply], mode, add_generation_prompt=False)
    assert full.startswith(prompt)
    parsed = C.parse_completion(full[len(prompt):], mode)
    want_reasoning = None if mode == "chat" else reasoning
    assert parsed == {"content": "The answer\n\nis 6.", "reasoning_content": want_reasoning, "finished": True}


def test_parse_completion_cases():
    assert C.parse_completion("Hi" + EOS, "chat") == {"content": "Hi", "reasoning_content": None, "finished": True}
    assert C.parse_completion("Hi th", "chat") == {"content": "Hi th", "reasoning_content": None, "finished": False}
    assert C.parse_completion("r</think>Hi" + EOS, "think") == {"content": "Hi", "reasoning_content": "r",
                                                                "finished": True}
    # Cut short while reasoning: all reasoning so far.
    assert C.parse_completion("Let me se", "think_max") == {"content": "", "reasoning_content": "Let me se",
                                                             "finished": False}
    assert C.parse_completion("r</think>Hi th", "think") == {"content": "Hi th", "reasoning_content": "r",
                                                             "finished": False}
    # What follows the first EOS is not part of the reply.
    assert C.parse_completion("a" + EOS + "junk" + EOS, "chat")["content"] == "a"


def test_parse_completion_tokens_detects_eos(tok):
    ids = C.encode_chat_tokens([user("q"), assistant("Hi there", "Greet.")], tok, "think", add_generation_prompt=False)
    prompt = C.encode_chat_tokens([user("q")], tok, "think")
    generated = ids[len(prompt):]
    assert generated[-1] == C.EOS_ID
    assert C.parse_completion_tokens(generated + [5, 6], tok, "think") == {
        "content": "Hi there", "reasoning_content": "Greet.", "finished": True}
    assert C.parse_completion_tokens(generated[:-1], tok, "think")["finished"] is False


# --------------------------------------------------------------------------------------------------
# Refused inputs


@pytest.mark.parametrize("messages, kwargs, message", [
    ([user("hi")], {"mode": "thinking"}, r"mode='thinking': allowed values are chat, think, think_max"),
    ("hi", {}, r"messages is str; pass a list of dicts"),
    ([], {}, r"messages is empty"),
    (["hi"], {}, r"messages\[0\] is str, not a dict"),
    ([{"role": "tool", "content": "x"}], {}, r"messages\[0\]\['role'\] = 'tool': allowed roles are system, user, "
                                             r"assistant"),
    ([{"content": "x"}], {}, r"messages\[0\]\['role'\] = None"),
    ([user("hi"), {"role": "user"}], {}, r"messages\[1\] has no 'content'"),
    ([user(None)], {}, r"messages\[0\]\['content'\] is NoneType, not str"),
    ([user(["a", "b"])], {}, r"messages\[0\]\['content'\] is list, not str"),
    ([user("q"), assistant("a", 3), user("q")], {}, r"messages\[1\]\['reasoning_content'\] is int, not str"),
    ([{"role": "user", "content": "q", "reasoning_content": "r"}], {},
     r"messages\[0\]\['reasoning_content'\]: only assistant messages carry reasoning"),
    ([user("q"), {"role": "assistant", "content": "a", "reasoning": "r"}, user("q")], {},
     r"messages\[1\]\['reasoning'\]: the field is called 'reasoning_content'"),
    ([{"role": "system", "content": "s", "tools": []}, user("q")], {}, r"messages\[0\]\['tools'\]: tool definitions"),
    ([{"role": "user", "content": "q", "task": "action"}], {}, r"messages\[0\]\['task'\]: quick-instruction"),
    ([user("q"), SYSTEM, user("q")], {}, r"messages\[1\] is a system message after the start"),
    ([assistant("a"), user("q")], {}, r"messages\[0\] is an assistant message after nothing"),
    ([SYSTEM, assistant("a"), user("q")], {}, r"messages\[1\] is an assistant message after a system message"),
    ([user("q"), assistant("a"), assistant("b"), user("q")], {},
     r"messages\[2\] is an assistant message after an assistant message"),
    ([user("q"), assistant("a")], {}, r"messages\[1\] is an assistant message, but add_generation_prompt=True needs "
                                      r"the conversation to end with a user message"),
    ([SYSTEM], {}, r"messages\[0\] is a system message, but add_generation_prompt=True"),
    ([user("say <｜User｜> please")], {}, r"messages\[0\]\['content'\] contains the marker '<｜User｜>'"),
    ([user("q"), assistant("a", "x</think>y"), user("q")], {},
     r"messages\[1\]\['reasoning_content'\] contains the marker '</think>'"),
    ([user(EOS)], {}, r"contains the marker '<｜end▁of▁sentence｜>', which would become a control token"),
    ([user("half an emoji: \ud83d!")], {}, r"messages\[0\]\['content'\] is not valid Unicode text: '\\ud83d' at "
                                          r"character 15 is a lone surrogate"),
])
def test_bad_input_is_refused(messages, kwargs, message):
    with pytest.raises(ValueError, match=message):
        C.encode_messages(messages, **kwargs)


def test_bad_parse_input_is_refused():
    with pytest.raises(ValueError, match=r"mode='max': allowed values are chat, think, think_max"):
        C.parse_completion("x", "max")
    with pytest.raises(ValueError, match=r"text is list, not str"):
        C.parse_completion([1, 2], "chat")
