"""Post-training on the trainer (spec §4 "Post-training"): GRPO and multi-teacher on-policy distillation.

A run with a ``post:`` section (``PostConfig``) trains its first ``post.sft_steps`` steps
supervised on the prompts' answers (the trainer's language-model step, the loss on the answer
tokens only), then each step:

1. **Rollout.** ``post.prompts_per_step`` (P) training prompts (``v4jax.tasks``), each sampled
   ``post.samples_per_prompt`` (G) times by the current policy through the decode loop
   (``v4jax.generate.generate``, ``post.temperature``, ``post.max_new_tokens``), with every
   token's log-probability under the distribution it was drawn from: the old policy's.
   A completion ends at its first EOS (kept: stopping is one of its actions) or at the limit.
2. **Scores.** Each completion's rewards (``post.rewards``: name -> weight). GRPO: the advantage
   of a completion is its reward normalised within its prompt's G samples, and the frozen
   reference policy's log-probabilities of the same tokens are computed. Distillation: every
   teacher's log-probabilities over the whole vocabulary at each completion position.
3. **Update.** The trainer's own step (``v4jax.trainer.make_train_step``: gradient accumulation,
   clipping, Muon/AdamW, router biases, the finite checks, the mesh) with the objective of
   ``v4jax.policy_losses`` (``grpo_objective``, ``distill_objective``) in place of the
   cross-entropy. The policy's log-probabilities are of the logits divided by the sampling
   temperature, as the old policy's are.

One rollout serves one update, so the ratio to the old policy is 1 up to the difference between
the decode path and the training forward (the ``ratio`` metric shows it).

The reference policy is ``post.init`` (the checkpoint the policy starts from) or, when the run
starts from scratch, the policy after its supervised steps, saved as ``WORKDIR/reference`` (a
v4jax model directory) so that a resumed run finds it. Teachers are any v4jax checkpoints
(``v4jax.from_pretrained``) with the student's vocabulary.

Every host samples every row (the same prompts and seeds, so the same tokens) and keeps its own
rows of the batch: simple and correct; the sampling work is not split over hosts.

Shape letters: B rows (P x G), T positions (``data.seq_len``), V vocabulary, K teachers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.chat import MODES
from v4jax.config import ConfigError, ModelConfig
from v4jax.data import finish_batch
from v4jax.generate import generate
from v4jax.layers import linear_f32
from v4jax.model import forward
from v4jax.policy_losses import group_advantages, grpo_loss, reverse_kl_loss, token_log_probs
from v4jax.tasks import (
    PromptSampler,
    answer_tokens,
    completion,
    load_prompts,
    load_reward,
    prompt_tokens,
    score,
    split_prompts,
)
from v4jax.tokenizer import PAD_ID, load_tokenizer

F32 = jnp.float32
METHODS = ("grpo", "distill")
STATE_FORMAT = "v4jax-post-1"


@dataclasses.dataclass(frozen=True)
class PostConfig:
    """The ``post:`` section of a YAML config (module docstring)."""

    method: str = "grpo"  # grpo | distill
    prompts: str = "arithmetic"  # a built-in task (v4jax.tasks) or a .jsonl of {"prompt", "answer"}
    heldout_fraction: float = 0.05  # prompts held out for evaluation, by the hash of their text
    prompts_per_step: int = 8  # P; data.batch_size must be P x G (the rows of one update)
    samples_per_prompt: int = 8  # G
    max_new_tokens: int = 8
    temperature: float = 1.0  # sampling temperature of the rollouts (> 0)
    rewards: dict = dataclasses.field(default_factory=lambda: {"exact_match": 1.0})  # name -> weight
    clip_eps: float = 0.2  # GRPO's ratio clip
    kl_coef: float = 0.04  # GRPO's k3 KL penalty to the reference (0: no reference)
    # learning rate of the policy steps (constant; train.lr's schedule is the supervised steps'). Muon
    # takes steps of a set size whatever the gradient's: a policy gradient is noisy, so small ones
    lr: float = 1e-4
    init: str | None = None  # the starting policy: a train.py workdir or a v4jax model directory
    sft_steps: int = 0  # supervised steps on the prompts' answers before the policy steps
    teachers: list = dataclasses.field(default_factory=list)  # distill: checkpoint paths
    teacher_weights: list | None = None  # one per teacher (default: equal, summing to 1)
    eval_prompts: int = 64  # held-out prompts answered greedily at each evaluation (train.eval_every)
    chat_mode: str = "chat"  # deepseek tokenizer: the chat format's mode of the prompts

    def __post_init__(self):
        def need(ok, field, allowed):
            if not ok:
                raise ConfigError(f"post.{field}={getattr(self, field)!r} is not allowed: {allowed}")

        def integer(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(self.method in METHODS, "method", " | ".join(METHODS))
        need(isinstance(self.prompts, str) and self.prompts, "prompts", "'arithmetic' or a .jsonl path")
        need(number(self.heldout_fraction) and 0 < self.heldout_fraction < 1, "heldout_fraction",
             "a number in (0, 1)")
        for f in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "eval_prompts"):
            need(integer(getattr(self, f), 1), f, "an integer >= 1")
        need(integer(self.sft_steps, 0), "sft_steps", "an integer >= 0")
        need(number(self.temperature) and self.temperature > 0, "temperature",
             "a number > 0 (the policy's log-probabilities are of the tempered distribution)")
        need(number(self.clip_eps) and 0 < self.clip_eps < 1, "clip_eps", "a number in (0, 1)")
        need(number(self.kl_coef) and self.kl_coef >= 0, "kl_coef", "a number >= 0")
        need(number(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(isinstance(self.rewards, dict) and all(isinstance(k, str) and number(w) for k, w in self.rewards.items()),
             "rewards", "a mapping of reward name (exact_match, format or module:function) to weight")
        need(self.init is None or (isinstance(self.init, str) and self.init), "init", "a checkpoint path or null")
        need(isinstance(self.teachers, list) and all(isinstance(t, str) and t for t in self.teachers), "teachers",
             "a list of checkpoint paths")
        need(self.chat_mode in MODES, "chat_mode", " | ".join(MODES))
        if self.method == "grpo":
            need(bool(self.rewards), "rewards", "at least one reward for GRPO")
            need(self.samples_per_prompt >= 2, "samples_per_prompt",
                 "at least 2 for GRPO (advantages are relative to the prompt's other samples)")
            need(not self.teachers, "teachers", "none for GRPO (they are for method: distill)")
        else:
            need(bool(self.teachers), "teachers", "at least one checkpoint for method: distill")
        if self.teacher_weights is not None:
            need(isinstance(self.teacher_weights, list) and len(self.teacher_weights) == len(self.teachers)
                 and all(number(w) and w >= 0 for w in self.teacher_weights) and sum(self.teacher_weights) > 0,
                 "teacher_weights", f"a list of {len(self.teachers)} numbers >= 0, not all 0")
        need(self.init is not None or self.sft_steps > 0, "init",
             "a starting checkpoint, unless post.sft_steps > 0 fits the task from scratch first")

    @property
    def rows(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def weights(self) -> list[float]:
        w = self.teacher_weights or [1.0] * len(self.teachers)
        return [float(x) / sum(w) for x in w]

    @property
    def uses_reference(self) -> bool:
        return self.method == "grpo" and self.kl_coef > 0


# --------------------------------------------------------------------------------------------------
# Rows


def rows_batch(sequences: list[list[int]], trained: list[list[bool]], width: int, rows: int, hasher=None
               ) -> dict[str, np.ndarray]:
    """Token sequences (one document per row, padded to ``width``) as a training batch
    (``v4jax.data``'s layout), the loss counting only the targets whose token is ``trained``."""
    tokens = np.full((rows, width), PAD_ID, np.int32)
    seg = np.zeros((rows, width), np.int32)
    flags = np.zeros((rows, width), np.float32)
    for r, (ids, tr) in enumerate(zip(sequences, trained, strict=True)):
        tokens[r, :len(ids)], seg[r, :len(ids)], flags[r, :len(ids)] = ids, 1, tr
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)) * (seg > 0)
    return finish_batch({"tokens": tokens, "tokens_segment_ids": seg, "tokens_positions": pos, "trained": flags},
                        rows=rows, pad_id=PAD_ID, hasher=hasher)


# --------------------------------------------------------------------------------------------------
# Log-probabilities of other models and the objectives


@functools.partial(jax.jit, static_argnames=("config", "dtype", "temperature"))
def target_log_probs(params, batch, config: ModelConfig, dtype, temperature: float) -> jax.Array:
    """log pi(targets) [B, T] under ``params`` at ``temperature`` (the reference policy's)."""
    out = forward(params, batch["tokens"], config, positions=batch["positions"], segment_ids=batch["segment_ids"],
                  dtype=dtype, engram_ids=batch.get("engram_ids"))
    return token_log_probs(out["logits"] / temperature, batch["targets"])


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def vocab_log_probs(params, batch, config: ModelConfig, dtype) -> jax.Array:
    """log pi(v) [B, T, V] at every position (a teacher's)."""
    out = forward(params, batch["tokens"], config, positions=batch["positions"], segment_ids=batch["segment_ids"],
                  dtype=dtype, engram_ids=batch.get("engram_ids"))
    return jax.nn.log_softmax(out["logits"], axis=-1)


def grpo_objective(post: PostConfig) -> Callable:
    """The trainer's objective for GRPO (``v4jax.trainer.loss_fn``): the batch carries ``old_logp``,
    ``ref_logp`` and ``advantages`` [B, T]."""

    def objective(hidden, head, batch, update):
        logp = token_log_probs(linear_f32(hidden, head) / post.temperature, batch["targets"])
        return grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["loss_mask"],
                         post.clip_eps, post.kl_coef, update["sequences"], update["tokens"])

    return objective


def distill_objective(post: PostConfig) -> Callable:
    """The trainer's objective for distillation: the batch carries ``teacher_logp`` [B, T, V], the
    teachers' log-probabilities weighted by ``post.weights``. Metrics:
    ``reverse_kl`` and ``agreement`` (the share of completion tokens where the student's most likely
    token is the weighted teachers')."""

    def objective(hidden, head, batch, update):
        logits = linear_f32(hidden, head)
        loss = reverse_kl_loss(logits, batch["teacher_logp"], batch["loss_mask"], update["sequences"])
        same = (jnp.argmax(logits, -1) == jnp.argmax(batch["teacher_logp"], -1)).astype(F32)
        agreement = jnp.sum(same * batch["loss_mask"]) / jnp.maximum(update["tokens"], 1.0)
        return loss, {"reverse_kl": jax.lax.stop_gradient(loss), "agreement": jax.lax.stop_gradient(agreement)}

    return objective


def objective_for(post: PostConfig) -> Callable:
    return grpo_objective(post) if post.method == "grpo" else distill_objective(post)


# --------------------------------------------------------------------------------------------------
# The run's data: prompts, rollouts, evaluation


def load_policy(path: str, dtype, mesh, what: str | None = None):
    """A checkpoint's (config, parameters, tokenizer name): the starting policy, the reference or a
    teacher. A checkpoint that cannot be read is a ``ConfigError`` beginning with ``what`` (default
    "cannot load PATH")."""
    from v4jax.api import from_pretrained  # noqa: PLC0415 (the API layer sits above this one)

    try:
        model = from_pretrained(path, dtype=dtype, mesh=mesh)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{what or f'cannot load {path}'}: {e}") from None
    return model.config, model.params, model.tokenizer_name


class Rollouts:
    """The data of a post-training run (module docstring): the supervised batches of its first
    steps, each later step's rollout batch, held-out evaluation, and the iterator state a
    checkpoint keeps. Everything about the prompts, rewards and teachers is checked when it is
    made, before any step."""

    def __init__(self, run, mesh, to_global: Callable, workdir: Path | None = None, hasher=None):
        post, data = run.post, run.data
        self.run, self.post, self.mesh, self.to_global = run, post, mesh, to_global
        self.workdir, self.hasher = workdir, hasher
        self.dtype = jnp.bfloat16 if run.train.dtype == "bfloat16" else F32
        self.tokenizer = load_tokenizer(data.tokenizer)
        if data.batch_size != post.rows:
            raise ConfigError(f"data.batch_size={data.batch_size} must be post.prompts_per_step x "
                              f"post.samples_per_prompt = {post.rows} (the rows of one update)")
        if data.tokenizer == "bytes" and post.chat_mode != "chat":
            raise ConfigError("post.chat_mode is for the deepseek tokenizer's chat format; with data.tokenizer=bytes "
                              "prompts are plain text: leave it at chat")
        self.rewards = {name: (load_reward(name), float(w)) for name, w in post.rewards.items()}
        self.train_prompts, self.heldout = split_prompts(load_prompts(post.prompts), post.heldout_fraction)
        self.heldout = self.heldout[:post.eval_prompts]
        missing = [p.text for p in self.train_prompts + self.heldout if p.answer is None]
        if missing and ("exact_match" in post.rewards or post.sft_steps):
            raise ConfigError(f"post.prompts={post.prompts!r}: {len(missing)} prompts have no answer (e.g. "
                              f"{missing[0]!r:.60}), and exact_match or post.sft_steps needs one")
        self._ids = {}
        longest = max(len(self._prompt(p.text)) for p in self.train_prompts + self.heldout)
        if longest + post.max_new_tokens > data.seq_len:
            raise ConfigError(f"the longest prompt ({longest} tokens) plus post.max_new_tokens={post.max_new_tokens} "
                              f"does not fit data.seq_len={data.seq_len}: raise data.seq_len or shorten them")
        if post.sft_steps:
            longest = max(len(self._prompt(p.text)) + len(answer_tokens(p.answer, self.tokenizer, post.chat_mode))
                          for p in self.train_prompts)
            if longest > data.seq_len:
                raise ConfigError(f"the longest prompt with its answer ({longest} tokens) does not fit "
                                  f"data.seq_len={data.seq_len}")
        self.sampler = PromptSampler(self.train_prompts, post.prompts_per_step, data.seed)
        self.sft_sampler = PromptSampler(self.train_prompts, data.batch_size, data.seed + 1)
        self.teachers = []
        for path in post.teachers:
            config, params, tok = load_policy(path, self.dtype, mesh)
            if config.vocab_size != run.model.vocab_size or tok not in (None, data.tokenizer):
                raise ConfigError(f"post.teachers: {path} has vocab_size={config.vocab_size} and tokenizer {tok}, the "
                                  f"student {run.model.vocab_size} and {data.tokenizer}: they must be the same")
            if config.engram is not None:  # the rollout batches carry no Engram ids for it
                raise ConfigError(f"post.teachers: {path} has Engram (model.engram), which distillation does not "
                                  "run yet: use a teacher without Engram")
            self.teachers.append((config, params))
        self.reference = None
        self._teacher_answers = None
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.local = slice(self.process * data.batch_size // self.processes,
                           (self.process + 1) * data.batch_size // self.processes)

    def _prompt(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = prompt_tokens(text, self.tokenizer, self.post.chat_mode)
        return self._ids[text]

    # --- checkpoint state: the prompts of step i depend on (seed, i) alone, so only the settings

    def _settings(self) -> dict[str, Any]:
        """What decides the prompts of a step (the rest, e.g. the learning rate, may change on resume)."""
        keep = ("prompts", "heldout_fraction", "prompts_per_step", "samples_per_prompt", "sft_steps")
        return {**{k: getattr(self.post, k) for k in keep}, "seed": self.run.data.seed, "processes": self.processes}

    def get_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "settings": self._settings()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a v4jax post-training state (format {STATE_FORMAT}): {state!r:.200}")
        mine, saved = self._settings(), state.get("settings", {})
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError("the checkpoint's post-training state was saved under other settings (field: saved, "
                             "now): " + ", ".join(f"{k}: {a!r}, {b!r}" for k, (a, b) in diff.items()))

    # --- the steps

    def sft_batch(self, step: int) -> dict:
        """Step ``step``'s supervised batch: a training prompt and its answer per row, the loss on
        the answer's tokens."""
        seqs, trained = [], []
        for p in self.sft_sampler(step):
            head, tail = self._prompt(p.text), answer_tokens(p.answer, self.tokenizer, self.post.chat_mode)
            seqs.append(head + tail)
            trained.append([False] * len(head) + [True] * len(tail))
        batch = rows_batch(seqs, trained, self.run.data.seq_len, self.run.data.batch_size, self.hasher)
        return self.to_global({k: v[self.local] for k, v in batch.items()})

    def start_policy_steps(self, params) -> None:
        """Before the first policy step of this process: the frozen reference (GRPO with kl_coef > 0)."""
        if not self.post.uses_reference or self.reference is not None:
            return
        if self.post.init is not None:
            self.reference = load_policy(self.post.init, self.dtype, self.mesh)[:2]
            return
        saved = self.workdir / "reference"
        if not saved.exists():  # the policy after the supervised steps
            from v4jax.api import Model  # noqa: PLC0415
            from v4jax.scan import unstack_layers  # noqa: PLC0415

            plain = unstack_layers(params, self.run.model) if "stages" in params else params
            Model(self.run.model, plain, jnp.dtype(F32), tokenizer_name=self.run.data.tokenizer).save(saved)
        self.reference = load_policy(str(saved), self.dtype, self.mesh)[:2]

    def _sample(self, params, prompts, samples: int, temperature: float, seed: int):
        """Each prompt ``samples`` times -> per row: (prompt ids, kept ids, their log-probs, text, finished)."""
        ids = [self._prompt(p.text) for p in prompts for _ in range(samples)]
        logp: list = []
        new = generate(params, self.run.model, ids, self.post.max_new_tokens, temperature=temperature, seed=seed,
                       stop_tokens=[], dtype=self.dtype, mesh=self.mesh, log_probs=logp)
        out = []
        for head, gen, lp in zip(ids, new, logp, strict=True):
            kept, text, finished = completion(gen, self.tokenizer, self.post.chat_mode)
            out.append((head, kept, lp[:len(kept)], text, finished))
        return out

    def policy_batch(self, params, step: int) -> tuple[dict, dict[str, float]]:
        """Step ``step``'s rollout as a global batch for the policy step, and its metrics:
        ``reward_mean``, ``reward_std`` (within prompts), each reward's mean (``reward_<name>``),
        ``completion_tokens``, ``finished``."""
        post = self.post
        prompts = self.sampler(step)
        rows = self._sample(params, prompts, post.samples_per_prompt, post.temperature,
                            seed=self.run.data.seed * 1_000_003 + step)
        scores = [score(self.rewards, prompts[r // post.samples_per_prompt], text, fin)
                  for r, (_, _, _, text, fin) in enumerate(rows)]
        reward = np.array([s["reward"] for s in scores], np.float32).reshape(post.prompts_per_step, -1)
        advantages = np.asarray(group_advantages(reward)).ravel()
        width, b = self.run.data.seq_len, post.rows
        batch = rows_batch([h + k for h, k, *_ in rows], [[False] * len(h) + [True] * len(k) for h, k, *_ in rows],
                           width, b, self.hasher)
        old = np.zeros((b, width), np.float32)
        for r, (head, kept, lp, _, _) in enumerate(rows):
            old[r, len(head) - 1:len(head) - 1 + len(kept)] = lp  # the target at t is token t + 1
        batch["old_logp"] = old
        batch["advantages"] = np.repeat(advantages[:, None], width, 1).astype(np.float32)
        batch = self.to_global({k: v[self.local] for k, v in batch.items()})
        if post.method == "grpo":
            batch["ref_logp"] = (target_log_probs(self.reference[1], batch, self.reference[0], self.dtype,
                                                  post.temperature)
                                 if self.reference is not None else batch["old_logp"])
        else:
            mixed = 0.0  # sum_i w_i log pi_i, one teacher's [B, T, V] at a time
            for (config, teacher), w in zip(self.teachers, post.weights):
                mixed = mixed + w * vocab_log_probs(teacher, batch, config, self.dtype)
            batch["teacher_logp"] = mixed
        metrics = {"reward_mean": float(reward.mean()), "reward_std": float(reward.std(-1).mean()),
                   "completion_tokens": float(np.mean([len(k) for _, k, *_ in rows])),
                   "finished": float(np.mean([fin for *_, fin in rows]))}
        metrics.update({f"reward_{name}": float(np.mean([s[name] for s in scores])) for name in self.rewards})
        return batch, metrics

    def evaluate(self, params) -> dict[str, float]:
        """The held-out prompts answered greedily: each reward's mean (``eval_reward_<name>``), their
        weighted sum (``eval_reward``) and, when distilling, ``eval_agreement``: the share of
        prompts answered as the first-weighted teacher answers them."""
        rows = self._sample(params, self.heldout, 1, 0.0, seed=0)
        scores = [score(self.rewards, p, text, fin) for p, (*_, text, fin) in zip(self.heldout, rows, strict=True)]
        out = {f"eval_reward_{name}": float(np.mean([s[name] for s in scores])) for name in self.rewards}
        out["eval_reward"] = float(np.mean([s["reward"] for s in scores]))
        if self.teachers:
            if self._teacher_answers is None:
                config, teacher = self.teachers[int(np.argmax(self.post.weights))]
                ids = [self._prompt(p.text) for p in self.heldout]
                new = generate(teacher, config, ids, self.post.max_new_tokens, temperature=0.0, stop_tokens=[],
                               dtype=self.dtype, mesh=self.mesh)
                self._teacher_answers = [completion(g, self.tokenizer, self.post.chat_mode)[1] for g in new]
            out["eval_agreement"] = float(np.mean([a == r[3] for a, r in zip(self._teacher_answers, rows)]))
        return out
