"""Next-token sampling: greedy, temperature, top-k, top-p, per row, seeded, jit-friendly.

Shape letters: B rows, V vocabulary entries.

Conventions (inference-design §5):

* **Parameters are data.** ``SamplingParams`` holds one value per row (``temperature`` f32 [B],
  ``top_p`` f32 [B], ``top_k`` int32 [B], ``seed`` uint32 [B]); a jitted caller traces once and
  never recompiles when the values change. Rows of one batch may mix greedy and sampled settings.
* **Greedy.** ``temperature == 0`` gives exactly ``jnp.argmax(logits, -1)`` (ties to the lowest id);
  such a row ignores ``top_k``, ``top_p`` and ``seed``.
* **Filter order, as HF's warpers:** logits / temperature, then top-k, then top-p, all in fp32.
  - top-k keeps exactly the ``k`` largest scaled logits; ``k == 0`` (or ``k >= V``) keeps all.
    Ties at the k-th value are broken by the **lowest token id** (HF keeps every token tied with the
    k-th value instead; the two differ only on exact ties).
  - top-p (nucleus) works on the probabilities after top-k (renormalised over the kept tokens),
    sorted in decreasing order: it keeps the smallest prefix whose mass is >= ``top_p``, and always
    at least one token (HF's ``TopPLogitsWarper``: a token is dropped when the mass of the tokens
    ranked above it is already >= ``top_p``). ``top_p == 1`` keeps everything.
  - Equal scaled values are ordered by token id throughout (one stable sort per row).
* **Randomness.** Row b draws with the key
  ``fold_in(fold_in(key(seed[b]), row_id[b]), step[b])`` (``jax.random.key``, which gives the same
  bits as the legacy ``PRNGKey``), so a row's draws depend only on its own seed, row id and step,
  never on which other rows share the batch. The draw is Gumbel-max in token order:
  ``argmax_v(filtered[v] + gumbel(key, (V,))[v])`` with filtered tokens at -inf. With no filter
  (``top_k == 0``, ``top_p == 1``) the token is therefore
  ``argmax(logits / temperature + jax.random.gumbel(key, (V,)))``.
* Logits that are NaN give unspecified tokens; -inf logits (masked vocabulary) are never drawn
  unless every kept logit of the row is -inf.

``sampling_params`` is the host-side constructor that validates its inputs; inside jit, build a
``SamplingParams`` directly (nothing there can check traced values).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
_I32_MAX = 2**31 - 1


class SamplingParams(NamedTuple):
    """Per-row sampling settings (a pytree of arrays, so jit treats them as data)."""

    temperature: jax.Array  # f32 [B]; 0 = greedy
    top_p: jax.Array  # f32 [B]; in (0, 1], 1 = off
    top_k: jax.Array  # int32 [B]; 0 = off
    seed: jax.Array  # uint32 [B]


def _per_row(name, value, batch):
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.broadcast_to(arr, (batch,))
    elif arr.shape != (batch,):
        raise ValueError(f"sampling_params: {name} must be a scalar or have one value per row (batch={batch}), "
                         f"got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"sampling_params: {name} must be numeric, got {value!r} (dtype {arr.dtype})")
    return arr


def _first_bad(name, arr, bad, allowed):
    if bad.any():
        i = int(np.argmax(bad))
        where = f" (row {i})" if arr.size > 1 else ""
        raise ValueError(f"sampling_params: {name} must be {allowed}, got {arr[i].item()!r}{where}")


def _integers(name, arr, lo, hi, allowed):
    """Integer-valued entries in [lo, hi]; integral floats (5.0) are accepted, 2.5 is not."""
    if arr.dtype.kind == "f":
        _first_bad(name, arr, ~np.isfinite(arr) | (arr != np.round(arr)), allowed)
    wide = arr.astype(np.float64) if arr.dtype.kind == "f" else arr.astype(object)
    _first_bad(name, arr, np.asarray((wide < lo) | (wide > hi), bool), allowed)
    return arr.astype(np.int64)


def sampling_params(batch: int, temperature=1.0, top_p=1.0, top_k=0, seed=0) -> SamplingParams:
    """Validated per-row ``SamplingParams`` for ``batch`` rows.

    Each argument is a scalar (the same for every row) or a sequence of ``batch`` values:
    ``temperature`` >= 0 and finite (0 = greedy), ``0 < top_p <= 1`` (1 = off), ``top_k`` an integer
    >= 0 (0 = off), ``seed`` an integer in [0, 2**32). Raises ``ValueError`` naming the argument,
    the bad value and the allowed range.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"sampling_params: batch must be an integer >= 1, got {batch!r}")
    batch = int(batch)
    t = _per_row("temperature", temperature, batch)
    _first_bad("temperature", t, ~np.isfinite(t) | (t < 0), "a finite number >= 0 (0 = greedy)")
    p = _per_row("top_p", top_p, batch)
    _first_bad("top_p", p, ~((p > 0) & (p <= 1)), "in (0, 1] (1 = off)")
    k = _integers("top_k", _per_row("top_k", top_k, batch), 0, _I32_MAX, f"an integer in [0, {_I32_MAX}] (0 = off)")
    s = _integers("seed", _per_row("seed", seed, batch), 0, 2**32 - 1, "an integer in [0, 2**32)")
    return SamplingParams(temperature=jnp.asarray(t, F32), top_p=jnp.asarray(p, F32),
                          top_k=jnp.asarray(k, jnp.int32), seed=jnp.asarray(s.astype(np.uint32)))


def _check_shapes(logits, params, step, row_ids):
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    b = logits.shape[0]
    for name, x in zip(SamplingParams._fields, params):
        if jnp.shape(x) != (b,):
            raise ValueError(f"params.{name} must have shape ({b},) to match logits {logits.shape}, got {jnp.shape(x)}")
    if step is not None and jnp.shape(step) not in ((), (b,)):
        raise ValueError(f"step must be a scalar or have shape ({b},), got {jnp.shape(step)}")
    if row_ids is not None and jnp.shape(row_ids) != (b,):
        raise ValueError(f"row_ids must have shape ({b},), got {jnp.shape(row_ids)}")


def row_keys(seed, step, row_ids=None):
    """Per-row keys [B]: ``fold_in(fold_in(key(seed[b]), row_id[b]), step[b])``; row_ids default to 0..B-1."""
    seed = jnp.asarray(seed).astype(jnp.uint32)
    b = seed.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (b,))
    return jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t))(seed, rows, steps)


def _sorted_filtered(logits, params):
    """logits [B, V] -> (scaled logits sorted decreasingly with the filtered ones at -inf [B, V] f32,
    their token ids [B, V] int32). Rows with temperature 0 are scaled by 1 (the caller overrides them)."""
    x = logits.astype(F32)
    t = params.temperature.astype(F32)
    x = x / jnp.where(t > 0, t, 1.0)[:, None]
    x = jnp.where(x == 0, 0.0, x)  # -0.0 -> +0.0: the sort orders -0.0 before +0.0, argmax treats them as equal
    _, v = x.shape
    pos = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    neg, ids = jax.lax.sort((-x, pos), dimension=1, is_stable=True, num_keys=1)  # ties keep the lower id first
    s = -neg
    k = params.top_k.astype(jnp.int32)
    k = jnp.where((k <= 0) | (k > v), v, k)
    keep = pos < k[:, None]
    probs = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    above = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)  # mass ranked strictly above
    p = params.top_p.astype(F32)[:, None]
    keep &= (above < p) | (p >= 1.0) | (pos == 0)
    return jnp.where(keep, s, -jnp.inf), ids


def _draw(logits, params, keys):
    """-> (tokens [B] int32, log-probabilities of those tokens under the filtered distribution [B] f32)."""
    s, ids = _sorted_filtered(logits, params)
    v = logits.shape[1]
    g = jax.vmap(lambda k: jax.random.gumbel(k, (v,), F32))(keys)  # token order
    at = jnp.argmax(s + jnp.take_along_axis(g, ids, axis=1), axis=-1)[:, None]
    tokens = jnp.take_along_axis(ids, at, axis=1)[:, 0]
    logp = jnp.take_along_axis(jax.nn.log_softmax(s, axis=-1), at, axis=1)[:, 0]
    return tokens.astype(jnp.int32), logp


def sample_with_log_probs(logits, params: SamplingParams, step, row_ids=None, all_greedy: bool | None = None):
    """``sample`` and ``log_probs`` of its tokens from one sort: -> (tokens [B] int32, logp [B] f32).
    ``all_greedy`` as in ``_sample``."""
    _check_shapes(logits, params, step, row_ids)
    return _sample(logits, params, row_keys(params.seed, step, row_ids), all_greedy)


def _sample(logits, params: SamplingParams, keys, all_greedy: bool | None = None):
    """Tokens [B] and their log-probabilities [B] (0 for greedy rows), the rows' keys given. The
    sort is skipped when every row is greedy. ``all_greedy`` (static) says whether they all are,
    when the caller knows (``v4jax.generate`` reads the temperatures on the host): True takes the
    argmax, False the draw, with no conditional; None decides at run time (``lax.cond``), which on a
    GPU reads the predicate on the host."""
    greedy = params.temperature <= 0
    g_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    argmax = lambda: (g_tok, jnp.zeros(g_tok.shape, F32))  # noqa: E731
    if all_greedy:
        return argmax()
    tok, logp = _unless_all_greedy(all_greedy, greedy, argmax, lambda: _draw(logits, params, keys))
    return jnp.where(greedy, g_tok, tok), jnp.where(greedy, 0.0, logp)


def _unless_all_greedy(all_greedy: bool | None, greedy, if_all_greedy, otherwise):
    """``otherwise()``, the sampled rows' work, unless every row is greedy: then ``if_all_greedy()``.
    ``all_greedy`` (static) says which when the caller knows; None decides at run time from
    ``greedy`` [B] (``lax.cond``)."""
    if all_greedy is None:
        return jax.lax.cond(jnp.all(greedy), if_all_greedy, otherwise)
    return if_all_greedy() if all_greedy else otherwise()


def sample(logits, params: SamplingParams, step, row_ids=None):
    """Draw one token per row.

    logits [B, V] (any float dtype, computed in fp32); params: ``SamplingParams`` with fields [B];
    step: int32 scalar or [B] (the decode step, folded into the key); row_ids: int32 [B] or None
    (= 0..B-1), the row's identity for the key, so a row keeps its draws whatever batch it is in.
    -> tokens int32 [B]. Pure and jit-compatible; the filters and key are described in the module
    docstring. When every row is greedy the sort is skipped (``lax.cond``).
    """
    _check_shapes(logits, params, step, row_ids)
    return sample_with_keys(logits, params, row_keys(params.seed, step, row_ids))


def sample_with_keys(logits, params: SamplingParams, keys, all_greedy: bool | None = None):
    """``sample`` with the rows' keys [B] given (greedy rows ignore theirs); ``all_greedy`` as in
    ``_sample``."""
    return _sample(logits, params, keys, all_greedy)[0]


def probabilities(logits, params: SamplingParams):
    """The distribution each row draws from, f32 [B, V] in token order: softmax of logits /
    temperature after top-k and top-p (filtered tokens 0); a greedy row's is one-hot at its argmax."""
    s, ids = _sorted_filtered(logits, params)
    b, v = logits.shape
    probs = jnp.zeros((b, v), F32).at[jnp.arange(b)[:, None], ids].set(jax.nn.softmax(s, axis=-1))
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), v, dtype=F32)
    return jnp.where((params.temperature <= 0)[:, None], onehot, probs)


def speculative_accept(target_logits, draft_logits, draft, params: SamplingParams, keys,
                       all_greedy: bool | None = None):
    """Speculative sampling of one token per row (Leviathan et al. 2023, Chen et al. 2023): with p and
    q the distributions ``sample`` draws from for target_logits and draft_logits [B, V] (same
    ``params``), and ``draft`` [B] drawn from q, keep the draft with probability min(1, p(d) / q(d)),
    else draw from max(p - q, 0) renormalised. The token is then distributed exactly as p, whatever q.

    A greedy row's p and q are one-hot at their argmax, so its draft is kept iff it is p's argmax,
    and the replacement is p's argmax. keys [B]: each row's key (two draws are folded from it).
    ``all_greedy`` (static) as in ``_sample``: None skips the sampled branch at run time when every
    row is greedy (``lax.cond``).
    -> (kept [B] bool, token [B] int32: the draft where kept, else the replacement).
    """
    greedy = params.temperature <= 0
    g_tok = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)

    def sampled():
        p, q = probabilities(target_logits, params), probabilities(draft_logits, params)
        pd = jnp.take_along_axis(p, draft[:, None], axis=1)[:, 0]
        qd = jnp.take_along_axis(q, draft[:, None], axis=1)[:, 0]
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (), F32))(keys)
        kept = u * qd < pd  # u < p(d) / q(d), with q(d) > 0 for a drawn d
        rest = jnp.maximum(p - q, 0.0)
        rest = jnp.where(rest.sum(-1, keepdims=True) > 0, rest, p)  # p == q: never needed (always kept)
        fix = jax.vmap(lambda k, r: jax.random.categorical(jax.random.fold_in(k, 1), jnp.log(r)))(keys, rest)
        return kept, fix.astype(jnp.int32)

    kept, fix = _unless_all_greedy(all_greedy, greedy, lambda: (draft == g_tok, g_tok), sampled)
    kept = jnp.where(greedy, draft == g_tok, kept)
    return kept, jnp.where(kept, draft, jnp.where(greedy, g_tok, fix))


def log_probs(logits, params: SamplingParams, tokens):
    """Log-probability f32 [B] of ``tokens`` int32 [B] under each row's filtered distribution.

    logits [B, V]. The distribution is the one ``sample`` draws from: softmax of logits / temperature
    after top-k and top-p, so filtered tokens get -inf. A greedy row (temperature 0) is a point mass:
    0 for ``argmax(logits)``, -inf for any other token. Tokens outside [0, V) get -inf.
    """
    _check_shapes(logits, params, None, None)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape != logits.shape[:1]:
        raise ValueError(f"tokens must have shape ({logits.shape[0]},), got {tokens.shape}")
    s, ids = _sorted_filtered(logits, params)
    lp = jnp.max(jnp.where(ids == tokens[:, None], jax.nn.log_softmax(s, axis=-1), -jnp.inf), axis=-1)
    g_lp = jnp.where(tokens == jnp.argmax(logits, axis=-1), 0.0, -jnp.inf)
    return jnp.where(params.temperature <= 0, g_lp, lp)
