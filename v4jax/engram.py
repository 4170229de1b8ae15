"""Engram: conditional memory looked up by hashed n-grams (arXiv 2601.07372; spec muon-engram-mhc §B).

Off in the V4-Flash/Pro presets (the release has none; V4.1 has it); on with ``model.engram``.

Shape letters: b batch, s tokens, n mHC streams, d model, j hash slots ((N-1)*K: orders 2..N times
K heads), e gathered width j*r (r = head_dim), k conv taps.

**Addresses, on the host** (``Hasher``; the input pipeline runs it, see ``v4jax.data``):

    x'_t       = P[x_t]                         tokenizer compression: ids of tokens whose text
                                                normalises alike (NFKC, NFD, no accents, lowercase,
                                                one space) share one compressed id
    mix_{t,n}  = XOR_{i<n} x'_{t-i} * m_{l,i}   suffix n-gram of order n = 2..N, within the
                                                document (before its start: the id of pad, token 2);
                                                m_{l,i}: odd random int64 multipliers of layer l
    id_{t,n,k} = mix_{t,n} mod p_{l,n,k} + offset_{l,n,k}
                                                head k's prime-sized table (primes >= table_size,
                                                none used twice), stacked into one table per layer

**Fusion, on the device** (``engram``), on the streams H [b, s, n, d] before the block (the
official demo's placement), for the retrieved e_t = concat_j table[id_{t,j}]:

    paper form:  k_m = W_K,m e + b_K,m,  v = W_V e + b_V
                 g_m = <RMSNorm_q,m(h_m), RMSNorm_k,m(k_m)> / sqrt(d)
                 a_m = sigmoid(sign(g_m) sqrt(max(|g_m|, 1e-6)))          (the demo's signed root)
                 Y   = a v + SiLU(CausalDepthwiseConv_k,dilation N(RMSNorm_m(a v)))
    v4.1 form:   [k_1..k_n, v] = wkv e   (one projection, no bias, no conv)
                 g_m = sum(h_m * q_m * w_m * k_m) rsqrt(mean h_m^2) rsqrt(mean k_m^2) / sqrt(d)
                 Y_m = sigmoid(signed root of g_m) v
    H <- H + Y

The value projection (``value_proj``, or wkv's value rows) and the conv start at zero, so a new
Engram changes nothing until it learns: a no-op at initialisation.
"""

from __future__ import annotations

import functools
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.config import EngramConfig, ModelConfig
from v4jax.layers import F32, linear_f32, rms_norm
from v4jax.params import MUON, TABLE, Init, ParamInfo, declare, pure, vector
from v4jax.tokenizer import load_tokenizer

PAD_TOKEN = 2  # the tokenizers' pad id: what an n-gram sees before a document's start
TABLE_ROW_MULTIPLE = 1024  # tables are padded to a multiple of this many rows, so meshes divide them


# --------------------------------------------------------------------------------------------------
# Tokenizer compression


def _normalise(text: str) -> str:
    """NFKC, NFD, accents stripped, lowercase, whitespace runs to one space, stripped (a lone space
    stays a space)."""
    if text == " ":
        return text
    t = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = " ".join(t.split())
    return t if t else (" " if text.isspace() and text else t)


@functools.lru_cache(maxsize=4)
def compression_map(tokenizer: str, vocab_size: int) -> np.ndarray:
    """P: token id -> compressed id, int64 [vocab_size]. Tokens whose decoded text normalises to the
    same string share an id; one that decodes to U+FFFD (a partial UTF-8 sequence) keeps an id of
    its own. ``tokenizer="none"`` is the identity."""
    if tokenizer == "none":
        return np.arange(vocab_size, dtype=np.int64)
    tok = load_tokenizer(tokenizer)
    keys: dict[str, int] = {}
    out = np.empty(vocab_size, np.int64)
    for i in range(vocab_size):
        text = tok.decode([i]) if i < tok.vocab_size else ""
        key = f"\0raw{i}" if "\ufffd" in text or not text else _normalise(text)
        out[i] = keys.setdefault(key, len(keys))
    return out


# --------------------------------------------------------------------------------------------------
# Tables and hashing


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


@functools.lru_cache(maxsize=16)
def table_primes(cfg: EngramConfig) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """The prime table size of every (Engram layer, order, head): successive primes >= table_size,
    taken in that order, none used twice."""
    out, p = [], cfg.table_size - 1
    for _ in cfg.layers:
        orders = []
        for _ in range(cfg.max_ngram - 1):
            heads = []
            for _ in range(cfg.heads):
                p += 1
                while not _is_prime(p):
                    p += 1
                heads.append(p)
            orders.append(tuple(heads))
        out.append(tuple(orders))
    return tuple(out)


def table_rows(cfg: EngramConfig) -> int:
    """Rows of each layer's table: its heads' primes, padded up to a multiple of TABLE_ROW_MULTIPLE
    (the largest layer's, so every Engram layer has one shape)."""
    rows = max(sum(sum(o) for o in layer) for layer in table_primes(cfg))
    return -(-rows // TABLE_ROW_MULTIPLE) * TABLE_ROW_MULTIPLE


class Hasher:
    """The rows each token reads, computed on the host: ``hasher(tokens, segment_ids)`` ->
    int32 [b, s, Engram layers, (N-1)*K], already offset into each layer's table.

    N-grams stay inside their segment (a packed row's documents never see each other), so a
    document gets the same rows wherever it is packed."""

    def __init__(self, config: ModelConfig):
        cfg = config.engram
        if cfg is None:
            raise ValueError("this config has no Engram (model.engram)")
        self.cfg = cfg
        self.compress = compression_map(cfg.tokenizer, config.vocab_size)
        self.compressed_vocab = int(self.compress.max()) + 1
        self.pad = int(self.compress[PAD_TOKEN])
        bound = int(np.iinfo(np.int64).max) // self.compressed_vocab // 2
        self.multipliers = []  # [layers][max_ngram] odd, so that x * m never overflows int64
        for layer in cfg.layers:
            rng = np.random.default_rng(cfg.seed + 10007 * layer)
            self.multipliers.append(rng.integers(0, bound, size=cfg.max_ngram, dtype=np.int64) * 2 + 1)
        self.primes = [np.asarray(layer, np.int64) for layer in table_primes(cfg)]  # [orders, heads]
        self.offsets = [np.concatenate([[0], np.cumsum(p.ravel())[:-1]]).reshape(p.shape) for p in self.primes]

    def __call__(self, tokens: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
        tokens, segment_ids = np.asarray(tokens), np.asarray(segment_ids)
        x = self.compress[tokens]  # [b, s] int64
        n_max = self.cfg.max_ngram
        # x'_{t-i} inside t's segment, pad before it: [b, s, i]
        back = np.full(x.shape + (n_max,), self.pad, np.int64)
        for i in range(n_max):
            same = np.zeros(x.shape, bool)
            same[:, i:] = segment_ids[:, i:] == segment_ids[:, : x.shape[1] - i]
            shifted = np.full(x.shape, self.pad, np.int64)
            shifted[:, i:] = x[:, : x.shape[1] - i]
            back[..., i] = np.where(same, shifted, self.pad)
        out = []
        for mult, primes, offsets in zip(self.multipliers, self.primes, self.offsets):
            terms = back * mult  # [b, s, i]
            mixes = np.bitwise_xor.accumulate(terms, axis=-1)[..., 1:]  # orders 2..N: [b, s, N-1]
            ids = mixes[..., :, None] % primes + offsets  # [b, s, N-1, K]
            out.append(ids.reshape(x.shape + (-1,)))
        return np.stack(out, axis=2).astype(np.int32)


def hasher_for(config: ModelConfig) -> Hasher | None:
    """The input pipeline's Engram hasher for a config, or None without Engram."""
    return None if config.engram is None else Hasher(config)


# --------------------------------------------------------------------------------------------------
# Fusion


def _signed_root(g: jax.Array) -> jax.Array:
    return jnp.sign(g) * jnp.sqrt(jnp.maximum(jnp.abs(g), 1e-6))


def _causal_depthwise_conv(x: jax.Array, w: jax.Array, dilation: int) -> jax.Array:
    """x [b, s, c], w [c, k] -> y[t] = sum_i w[:, i] x[t - (k-1-i) * dilation] (zeros before the row)."""
    k = w.shape[1]
    out = jnp.zeros(x.shape, F32)
    for i in range(k):
        shift = (k - 1 - i) * dilation
        shifted = jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, : x.shape[1]] if shift else x
        out = out + shifted.astype(F32) * w[:, i].astype(F32)
    return out


def engram(h: jax.Array, p: dict, ids: jax.Array, cfg: EngramConfig, eps: float) -> jax.Array:
    """The memory's contribution Y [b, s, n, d] to the streams h [b, s, n, d]; ids [b, s, j] from
    ``Hasher`` (this layer's slice). See the module docstring for both forms."""
    b, s, n, d = h.shape
    e = jnp.take(p["table"], ids, axis=0).reshape(b, s, -1).astype(h.dtype)  # [b, s, j*r]
    if cfg.form == "v4.1":
        kv = linear_f32(e, p["wkv"]).reshape(b, s, n + 1, d)
        k, v = kv[:, :, :n], kv[:, :, n]  # [b, s, n, d], [b, s, d]
        w = (p["q_weight"] * p["k_weight"]).astype(F32)  # [n, d]
        hf = h.astype(F32)
        g = jnp.sum(hf * w * k, axis=-1) * jax.lax.rsqrt(jnp.mean(hf * hf, -1) + eps) \
            * jax.lax.rsqrt(jnp.mean(k * k, -1) + eps) / np.sqrt(d)
        return (jax.nn.sigmoid(_signed_root(g))[..., None] * v[:, :, None, :]).astype(h.dtype)
    k = jnp.einsum("bse,nde->bsnd", e.astype(F32), p["key_proj"].astype(F32)) + p["key_bias"].astype(F32)
    v = linear_f32(e, p["value_proj"]) + p["value_bias"].astype(F32)  # [b, s, d]
    q = rms_norm(h.astype(F32), None, eps) * p["q_norm"].astype(F32)
    k = rms_norm(k, None, eps) * p["k_norm"].astype(F32)
    g = jnp.sum(q * k, axis=-1) / np.sqrt(d)  # [b, s, n]
    gated = jax.nn.sigmoid(_signed_root(g))[..., None] * v[:, :, None, :]  # [b, s, n, d]
    normed = rms_norm(gated, None, eps) * p["conv_norm"].astype(F32)
    conv = _causal_depthwise_conv(normed.reshape(b, s, n * d), p["conv"], cfg.max_ngram).reshape(b, s, n, d)
    return (gated + jax.nn.silu(conv)).astype(h.dtype)


# --------------------------------------------------------------------------------------------------
# The module


class Engram(nnx.Module):
    """One Engram layer's parameters: the hashed n-gram table (its own optimizer group, row-sharded)
    and the fusion with the n streams, in the paper's or V4.1's form."""

    def __init__(self, config: ModelConfig, init: Init):
        cfg, n, d = config.engram, config.hc_mult, config.hidden_size
        width = (cfg.max_ngram - 1) * cfg.heads * cfg.head_dim
        self.cfg, self.eps = cfg, config.rms_norm_eps
        self.table = declare(init, ParamInfo((table_rows(cfg), cfg.head_dim), "unit_normal", "param",
                                             ("table_rows", None), TABLE))
        if cfg.form == "v4.1":
            self.wkv = declare(init, ParamInfo(((n + 1) * d, width), "normal_zero_last_block", "param",
                                               (None, None), MUON, (d,) * (n + 1)))
            self.q_weight = declare(init, vector((n, d), (None, "embed")))
            self.k_weight = declare(init, vector((n, d), (None, "embed")))
            return
        self.key_proj = declare(init, ParamInfo((n, d, width), "normal", "param", (None, "embed", None), MUON))
        self.key_bias = declare(init, vector((n, d), (None, "embed"), init="zeros"))
        self.value_proj = declare(init, ParamInfo((d, width), "zeros", "param", ("embed", None), MUON))
        self.value_bias = declare(init, vector((d,), ("embed",), init="zeros"))
        self.q_norm = declare(init, vector((n, d), (None, "embed")))
        self.k_norm = declare(init, vector((n, d), (None, "embed")))
        self.conv_norm = declare(init, vector((n, d), (None, "embed")))
        self.conv = declare(init, vector((n * d, cfg.conv_kernel), init="zeros"))

    def __call__(self, h, ids):
        return engram(h, pure(self), ids, self.cfg, self.eps)
