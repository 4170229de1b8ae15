"""Prompts and rewards for post-training (``v4jax.post_training``).

A prompt set (``post.prompts``) is either

* ``arithmetic``: the bundled toy task, generated in code: every ``a+b=`` with 0 <= a, b < 100,
  answered by the sum's digits (10,000 prompts); or
* a ``.jsonl`` file, one object per line: ``{"prompt": str, "answer": str}`` (``answer`` may be
  left out where no reward needs it).

About ``heldout_fraction`` of the prompts are held out for evaluation, chosen by a hash of the
prompt text (``v4jax.data``'s rule for documents), so the split does not depend on the order or
the other prompts. ``PromptSampler`` draws each step's training prompts from the seed and the step
alone: a resumed run draws what the first attempt would have.

With the ``bytes`` tokenizer a prompt is its text, and the completion is the text the model writes
up to EOS. With the ``deepseek`` tokenizer a prompt is a user turn in the chat format
(``v4jax.chat``, ``post.chat_mode``), and the completion is the reply's content (after
``</think>`` in the think modes).

A reward is a function called with keywords ``prompt``, ``completion``, ``answer`` (the prompt's,
or None) and ``finished`` (the model wrote EOS before ``max_new_tokens``), returning a float:
``exact_match``, ``format``, or any ``module:function`` importable from the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from v4jax.chat import EOS_ID, encode_chat_tokens, parse_completion_tokens
from v4jax.config import ConfigError
from v4jax.data import hash_value
from v4jax.jsonl import json_lines
from v4jax.tokenizer import text_prompt

BUILTIN_PROMPTS = ("arithmetic",)


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    answer: str | None = None


def arithmetic_prompts() -> list[Prompt]:
    """The toy task: ``a+b=`` for 0 <= a, b < 100, answered by ``str(a + b)``."""
    return [Prompt(f"{a}+{b}=", str(a + b)) for a in range(100) for b in range(100)]


def read_prompts(path: str | Path) -> list[Prompt]:
    """A .jsonl prompt file, checked line by line (errors name the file and line)."""
    out = []
    for where, obj in json_lines(path, ConfigError):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ConfigError(f'{where}: each line must be an object with a non-empty string "prompt"')
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ConfigError(f'{where}: "answer" must be a string, got {type(answer).__name__}')
        out.append(Prompt(obj["prompt"], answer))
    if not out:
        raise ConfigError(f"{path}: no prompts")
    return out


def load_prompts(spec: str) -> list[Prompt]:
    if spec == "arithmetic":
        return arithmetic_prompts()
    if not spec.endswith(".jsonl"):
        raise ConfigError(f"post.prompts={spec!r} must be one of {BUILTIN_PROMPTS} or a .jsonl file of "
                          '{"prompt": ..., "answer": ...} lines')
    if not Path(spec).is_file():
        raise ConfigError(f"post.prompts={spec!r}: no such file")
    return read_prompts(spec)


def split_prompts(prompts: Sequence[Prompt], heldout_fraction: float) -> tuple[list[Prompt], list[Prompt]]:
    """(training, held-out) by the hash of each prompt's text; both must be non-empty."""
    held = [p for p in prompts if hash_value(p.text) < heldout_fraction]
    train = [p for p in prompts if hash_value(p.text) >= heldout_fraction]
    if not train or (heldout_fraction > 0 and not held):
        raise ConfigError(f"post.heldout_fraction={heldout_fraction} leaves {len(train)} training and {len(held)} "
                          f"held-out prompts of {len(prompts)}: both need some")
    return train, held


class PromptSampler:
    """Step ``i``'s prompts: ``count`` drawn with replacement from ``prompts`` by (seed, i)."""

    def __init__(self, prompts: Sequence[Prompt], count: int, seed: int):
        self.prompts, self.count, self.seed = list(prompts), count, seed

    def __call__(self, step: int) -> list[Prompt]:
        rng = np.random.default_rng([self.seed, step])
        return [self.prompts[i] for i in rng.integers(0, len(self.prompts), self.count)]


# --------------------------------------------------------------------------------------------------
# Tokens


def prompt_tokens(text: str, tokenizer, chat_mode: str) -> list[int]:
    """A prompt's ids: BOS and its text (bytes), or a user turn with the reply's opener (deepseek)."""
    if tokenizer.name == "bytes":
        return text_prompt(tokenizer, text)
    return encode_chat_tokens([{"role": "user", "content": text}], tokenizer, chat_mode)


def answer_tokens(answer: str, tokenizer, chat_mode: str) -> list[int]:
    """What a perfect completion writes: the answer and EOS (in the think modes an empty reasoning
    closed by ``</think>`` first). For supervised steps on the prompts' answers (``post.sft_steps``)."""
    if tokenizer.name == "bytes":
        return [int(i) for i in tokenizer.encode(answer)] + [EOS_ID]
    full = encode_chat_tokens([{"role": "user", "content": "."}, {"role": "assistant", "content": answer,
                                                                   "reasoning_content": ""}],
                              tokenizer, chat_mode, add_generation_prompt=False, drop_thinking=False)
    head = encode_chat_tokens([{"role": "user", "content": "."}], tokenizer, chat_mode)
    return full[len(head):]


def completion(ids: Sequence[int], tokenizer, chat_mode: str) -> tuple[list[int], str, bool]:
    """Generated ids -> (the ids the policy is trained on: up to and with the first EOS, the
    completion text a reward sees, finished)."""
    ids = [int(i) for i in ids]
    finished = EOS_ID in ids
    kept = ids[:ids.index(EOS_ID) + 1] if finished else ids
    if tokenizer.name == "bytes":
        return kept, tokenizer.decode(kept), finished  # (the byte tokenizer's decode drops EOS)
    return kept, parse_completion_tokens(kept, tokenizer, chat_mode)["content"], finished


# --------------------------------------------------------------------------------------------------
# Rewards


def _normal(text: str) -> str:
    return " ".join(text.split())


def exact_match(*, completion: str, answer: str | None, **_: Any) -> float:
    """1 when the completion, whitespace normalised, is the answer; else 0."""
    if answer is None:
        raise ValueError("the exact_match reward needs an answer for every prompt")
    return float(_normal(completion) == _normal(answer))


_ANSWER_FORMAT = re.compile(r"\S(.*\S)?", re.DOTALL)


def format_reward(*, completion: str, finished: bool, **_: Any) -> float:
    """1 when the model ended its reply (EOS before the length limit) with a non-empty answer
    without leading or trailing whitespace; else 0."""
    return float(finished and _ANSWER_FORMAT.fullmatch(completion) is not None)


BUILTIN_REWARDS: dict[str, Callable[..., float]] = {"exact_match": exact_match, "format": format_reward}


def load_reward(name: str) -> Callable[..., float]:
    """A built-in reward by name, or ``module:function`` imported."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"post.rewards: {name!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor "
                          "module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"post.rewards: cannot load {name!r} ({e})") from None
    if not callable(fn):
        raise ConfigError(f"post.rewards: {name!r} is not callable")
    return fn


def score(rewards: dict[str, tuple[Callable[..., float], float]], prompt: Prompt, text: str, finished: bool
          ) -> dict[str, float]:
    """Each reward's value for one completion and their weighted sum (``reward``)."""
    out = {}
    for name, (fn, _) in rewards.items():
        value = fn(prompt=prompt.text, completion=text, answer=prompt.answer, finished=finished)
        if not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value):
            raise ValueError(f"reward {name!r} returned {value!r} for prompt {prompt.text!r:.60}: it must return a "
                             "finite number")
        out[name] = float(value)
    out["reward"] = sum(w * out[name] for name, (_, w) in rewards.items())
    return out
