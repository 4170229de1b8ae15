"""Needle in a haystack: a fact placed at some depth of a long distractor text, asked at the end.

Each example is ``[bos] haystack[:k] needle haystack[k:] question`` with

    needle   = " The secret number of {name} is {value}. "
    question = " What is the secret number of {name}? The secret number of {name} is "

where the haystack is a window of held-out text, k = depth * (haystack length), the name is drawn
from a fixed list and the value is a 4-digit number. The model answers by likelihood: the true value
and ``candidates - 1`` other 4-digit numbers are appended to the question, and the example counts as
correct when the true value's tokens get the highest total log-probability. Chance is 1/candidates.
No generation is needed, so the score is deterministic for a given model and seed.

Accuracy is reported per context length (the tokens before the answer) and depth, as JSON and as a
heat map.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.engram import hasher_for
from v4jax.model import forward

NAMES = ("Ada", "Boris", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kamala",
         "Lior", "Mira", "Nils", "Oona", "Pavel")


@dataclasses.dataclass(frozen=True)
class NiahConfig:
    lengths: tuple[int, ...] = (128, 256, 512)  # tokens before the answer
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 8  # examples per (length, depth)
    candidates: int = 10  # answers scored per example (the true one among them)
    seed: int = 0


def _text_tokens(tokenizer, texts) -> np.ndarray:
    return np.concatenate([tokenizer.encode(t) for t in texts])


def build_examples(cfg: NiahConfig, tokenizer, haystack_texts) -> list[dict]:
    """Every example: prefix tokens [L] (bos, haystack with the needle, question), the candidate
    answers' tokens, the index of the true one, and its cell (length, depth)."""
    rng = np.random.default_rng(cfg.seed)
    hay = _text_tokens(tokenizer, haystack_texts)
    if max(cfg.lengths) >= len(hay):  # checked before any example is built
        raise ValueError(f"niah length {max(cfg.lengths)} needs more haystack than the text holds ({len(hay)} "
                         "tokens): use shorter --lengths or more text (--files)")
    out = []
    for length in cfg.lengths:
        for depth in cfg.depths:
            for _ in range(cfg.samples):
                name = NAMES[rng.integers(len(NAMES))]
                values = rng.choice(np.arange(1000, 10000), size=cfg.candidates, replace=False)
                needle = tokenizer.encode(f" The secret number of {name} is {values[0]}. ")
                question = tokenizer.encode(f" What is the secret number of {name}? The secret number of {name} is ")
                n_hay = length - 1 - len(needle) - len(question)
                if n_hay < 1:
                    raise ValueError(f"niah length {length} cannot hold the needle and the question "
                                     f"({len(needle) + len(question) + 1} tokens): use longer lengths")
                start = rng.integers(0, len(hay) - n_hay)
                window = hay[start:start + n_hay]
                k = int(round(depth * n_hay))
                prefix = np.concatenate([[tokenizer.bos_id], window[:k], needle, window[k:], question])
                answers = [tokenizer.encode(f"{v}.") for v in values]
                order = rng.permutation(cfg.candidates)
                out.append({"prefix": prefix.astype(np.int32), "answers": [answers[i] for i in order],
                            "truth": int(np.argmax(order == 0)), "length": length, "depth": depth})
    return out


def answer_logprobs(score_fn, example) -> np.ndarray:
    """Total log-probability of each candidate answer after the example's prefix.

    ``score_fn(tokens [rows, s]) -> log_probs [rows, s, V]`` (next-token log-probabilities)."""
    prefix, answers = example["prefix"], example["answers"]
    width = len(prefix) + max(len(a) for a in answers)
    rows = np.zeros((len(answers), width), np.int32)
    for r, a in enumerate(answers):
        rows[r, :len(prefix)] = prefix
        rows[r, len(prefix):len(prefix) + len(a)] = a
    logp = np.asarray(score_fn(jnp.asarray(rows)))
    out = np.zeros(len(answers))
    for r, a in enumerate(answers):
        pos = np.arange(len(prefix) - 1, len(prefix) - 1 + len(a))  # position t predicts token t + 1
        out[r] = logp[r, pos, a].sum()
    return out


def make_score_fn(params, config, dtype=jnp.float32):
    """Next-token log-probabilities of a parameter tree, hashing Engram rows on the host if needed."""
    hasher = hasher_for(config)

    @jax.jit
    def run(tokens, engram_ids):
        logits = forward(params, tokens, config, dtype=dtype, engram_ids=engram_ids)["logits"]
        return jax.nn.log_softmax(logits, axis=-1)

    def score(tokens):
        ids = None if hasher is None else jnp.asarray(hasher(np.asarray(tokens), np.ones(tokens.shape, np.int32)))
        return run(tokens, ids)

    return score


def evaluate_niah(score_fn, examples: list[dict], cfg: NiahConfig, progress: bool = False) -> dict:
    """Accuracy per (length, depth) over the ``cfg.samples`` examples of each (``build_examples``,
    made first so that a haystack too short is refused before any model work); also the chance level."""
    hits = {(ln, d): [] for ln in cfg.lengths for d in cfg.depths}
    it = examples
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        it = tqdm(examples, desc="niah", unit="example")
    for ex in it:
        scores = answer_logprobs(score_fn, ex)
        hits[(ex["length"], ex["depth"])].append(bool(np.argmax(scores) == ex["truth"]))
    accuracy = [[float(np.mean(hits[(ln, d)])) for d in cfg.depths] for ln in cfg.lengths]
    return {"task": "niah", "lengths": list(cfg.lengths), "depths": list(cfg.depths), "samples": cfg.samples,
            "candidates": cfg.candidates, "chance": 1.0 / cfg.candidates, "accuracy": accuracy,
            "mean_accuracy": float(np.mean(accuracy))}


def save_heatmap(result: dict, path: str | Path, title: str = "needle in a haystack") -> Path:
    """Accuracy by context length (rows) and depth (columns) as a PNG heat map."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    acc = np.asarray(result["accuracy"])
    fig, ax = plt.subplots(figsize=(1.2 * len(result["depths"]) + 2, 0.6 * len(result["lengths"]) + 1.6))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context (tokens)")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", color="w" if acc[i, j] < 0.6 else "k")
    ax.set_title(f"{title} (chance {result['chance']:.2f})")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
