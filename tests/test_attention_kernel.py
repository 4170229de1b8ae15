"""The Pallas kernels of the index-list attention (``v4jax.attention_kernel``), interpreted on CPU.

* SWA, CSA (listed entries, -1 slots, k not a multiple of the block) and HCA (every visible entry)
  over packed documents: the output, the entry probabilities and the gradients in q, kv, the entry
  keys and the sink (``jax.vjp``, random cotangents on the output and the probabilities) equal the
  XLA path ``v4jax.index_list.sparse_attention`` (itself tested against the dense reference);
* ``attention()`` with ``ParallelConfig(attention_kernel="pallas")`` equals "xla" on a tiny model
  (every layer kind, the indexer's aux outputs, and a gradient through the indexer loss);
* a bad ``attention_kernel`` is refused, naming the field and the values.

Small blocks (8 slots) make every list part span several blocks, partial ones included; heads
that are not a power of two exercise the padding up to 16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CONFIGS, rel, sharpened
from v4jax.attention import attention, compressed_entries
from v4jax.attention_kernel import Blocks, pallas_sparse_attention
from v4jax.index_list import Entries, sparse_attention
from v4jax.losses import indexer_kl
from v4jax.model import init_params
from v4jax.parallel import ParallelConfig, ShardingError

TOLERANCE = 1e-5  # max |kernel - xla| / max |xla|, fp32 (the two agree to ~3e-7)

CASES = {  # b, s, h, c, window, documents, ratio, listed top-k (None: every visible entry)
    "swa": (2, 48, 2, 16, 8, (20, 5, 23), None, None),
    "csa": (2, 64, 4, 32, 12, (30, 3, 31), 4, 5),
    "hca": (2, 96, 3, 16, 16, (41, 55), 8, None),
}


def _case(name, seed=0):
    b, s, h, c, window, docs, m, k = CASES[name]
    rng = np.random.default_rng(seed)
    pos = np.broadcast_to(np.concatenate([np.arange(n) for n in docs]), (b, s)).astype(np.int32)
    seg = np.broadcast_to(np.concatenate([np.full(n, i + 1) for i, n in enumerate(docs)]), (b, s)).astype(np.int32)
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
    diff = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, s, h, c), (b, s, c), (h,))]
    entries = idx = None
    if m is not None:
        start, valid = compressed_entries(pos, seg, m)
        block_pos = jnp.take_along_axis(pos, start, axis=1)
        entries = Entries(jnp.asarray(rng.normal(size=(b, start.shape[1], c)), jnp.float32),
                          jnp.take_along_axis(seg, start, axis=1), block_pos + (m - 1), start + (m - 1), valid)
        diff.append(entries.keys)
    if k is not None:  # k random distinct visible entries per query, in random slots, -1 for the rest
        vis = np.asarray(entries.visible(seg, pos))
        idx = np.full((b, s, k), -1, np.int32)
        for i, t in np.ndindex(b, s):
            picks = rng.permutation(np.flatnonzero(vis[i, t]))[: rng.integers(0, k + 1)]
            idx[i, t, rng.permutation(k)[: len(picks)]] = picks
        assert (idx == -1).any() and (idx >= 0).any()
        idx = jnp.asarray(idx)
    return diff, (seg, pos, window, entries, idx)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_xla_path(name):
    diff, (seg, pos, window, entries, idx) = _case(name)

    def run(fn, q, kv, sink, keys=None):
        ent = None if entries is None else entries._replace(keys=keys)
        return fn(q, kv, sink, seg, pos, window, ent, idx, with_probs=entries is not None)

    def kernel(*a, **kw):
        return pallas_sparse_attention(*a, **kw, blocks=Blocks(8, 8, 4))

    want, vjp_want = jax.vjp(lambda *a: run(sparse_attention, *a), *diff)
    got, vjp_got = jax.vjp(lambda *a: run(kernel, *a), *diff)
    assert rel(got[0], want[0]) <= TOLERANCE
    if entries is None:
        assert got[1] is None and want[1] is None
    else:
        assert got[1].shape == want[1].shape
        assert rel(got[1], want[1]) <= TOLERANCE
    rng = np.random.default_rng(1)
    cotangent = tuple(None if w is None else jnp.asarray(rng.normal(size=w.shape), jnp.float32) for w in want)
    for label, g, w in zip(("q", "kv", "sink", "entry keys"), vjp_got(cotangent), vjp_want(cotangent)):
        assert rel(g, w) <= TOLERANCE, (label, rel(g, w))


def test_attention_switch_pallas_equals_xla():
    """Every layer of a tiny model (CSA, SWA, HCA) on two packed documents, with the indexer's aux."""
    config = CONFIGS["c"]
    params = sharpened(init_params(config, seed=0))
    b, s = 2, 53
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, s, config.hidden_size)), jnp.float32)
    pos = jnp.asarray(np.broadcast_to(np.r_[np.arange(30), np.arange(23)], (b, s)).astype(np.int32))
    seg = jnp.asarray(np.broadcast_to(np.r_[np.ones(30), np.full(23, 2)], (b, s)).astype(np.int32))
    proj = jnp.asarray(rng.normal(size=(b, s, config.hidden_size)), jnp.float32)
    for layer in range(config.num_hidden_layers):
        p = params["layers"][layer]["attn"]

        def loss(x, kernel, p=p, layer=layer):
            out, aux = attention(x, p, config, layer, pos, seg, True, True, ParallelConfig(attention_kernel=kernel))
            kl = indexer_kl(aux["index_scores"], aux["entry_probs"], aux["entry_mask"], seg > 0) if aux else 0.0
            return jnp.sum(out * proj) + kl, (out, aux)

        (_, (want, want_aux)), want_dx = jax.value_and_grad(loss, has_aux=True)(x, "xla")
        (_, (got, got_aux)), got_dx = jax.value_and_grad(loss, has_aux=True)(x, "pallas")
        assert rel(got, want) <= TOLERANCE, layer
        assert rel(got_dx, want_dx) <= TOLERANCE, layer
        assert got_aux.keys() == want_aux.keys() == ({"index_scores", "entry_mask", "entry_probs"}
                                                     if layer == 0 else set())
        if got_aux:
            np.testing.assert_array_equal(got_aux["entry_mask"], want_aux["entry_mask"])
            assert rel(got_aux["entry_probs"], want_aux["entry_probs"]) <= TOLERANCE


def test_bad_attention_kernel_is_refused():
    with pytest.raises(ShardingError, match=r"parallel\.attention_kernel='triton': xla or pallas"):
        ParallelConfig(attention_kernel="triton")
