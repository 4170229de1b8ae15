"""Self-speculative decoding with the MTP block (v4jax.generate, speculative="mtp"), on the CPU in fp32.

References: ``v4jax.model.forward`` with ``mtp=True`` on the whole sequence for the MTP block's
decode cache (tolerance 1e-5 relative); plain greedy generation for greedy output (equal); and for
sampling the exact distribution of the next tokens, computed in numpy from the forward's logits on
every prefix (chi-square at p = 1e-6). The rejection step alone is checked against the published
algorithm's distribution on fixed logits.
"""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CHI2_1E6, CONFIGS, np_filtered, rel, sharpened
from v4jax.decode import init_cache, last_index, logits_at, mtp_chunk, run_chunk
from v4jax.generate import generate, speculate_tokens, start_speculation
from v4jax.model import forward, init_params
from v4jax.sampling import row_keys, sample, sampling_params, speculative_accept

F32 = jnp.float32


def _chi2_ok(counts, probs, n):
    """Chi-square of counts against n * probs over the cells with n p >= 5 (the rest pooled into one)."""
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return chi2, int(keep.sum()) - 1


@pytest.mark.parametrize("all_greedy", [None, False])
def test_rejection_step_gives_the_target_distribution(all_greedy):
    """Draft d ~ q, then ``speculative_accept``: the kept-or-replaced token is distributed as p (8
    tokens, temperature, top-k and top-p filters on both), and a draft is kept with probability
    sum_v min(p_v, q_v) (the published acceptance rate); with the branch chosen at run time (None)
    or by the caller (False: no row is greedy)."""
    n = 40_000
    zp = np.array([0.3, 2.0, -1.0, 1.2, 0.9, -0.4, 1.6, -2.5], np.float32)
    zq = np.array([1.5, 0.1, 0.4, 1.1, -0.3, 0.8, 0.2, 0.0], np.float32)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9)):
        sp = sampling_params(n, temperature=temperature, top_k=top_k, top_p=top_p, seed=77)
        p_logits = jnp.broadcast_to(jnp.asarray(zp), (n, 8))
        q_logits = jnp.broadcast_to(jnp.asarray(zq), (n, 8))
        keys = row_keys(sp.seed, jnp.int32(5))
        draft = sample(q_logits, sp, jnp.int32(9))
        accept = jax.jit(speculative_accept, static_argnames="all_greedy")
        kept, token = accept(p_logits, q_logits, draft, sp, keys, all_greedy=all_greedy)
        p, q = (np_filtered(z, temperature, top_k, top_p) for z in (zp, zq))
        chi2, dof = _chi2_ok(np.bincount(np.asarray(token), minlength=8), p, n)
        assert chi2 < CHI2_1E6[dof], (temperature, top_k, top_p, chi2)
        assert set(np.asarray(token)[~np.asarray(kept)].tolist()) <= set(np.flatnonzero(p > q).tolist())
        rate, want = float(np.mean(kept)), float(np.minimum(p, q).sum())
        assert abs(rate - want) < 5 * np.sqrt(want * (1 - want) / n), (rate, want)


def test_rejection_step_greedy_rows():
    """A greedy row keeps the draft iff it is the target's argmax, else takes the argmax; in a batch
    with sampled rows too (the branch chosen at run time, or all_greedy=False), and alone
    (all_greedy=True)."""
    p_logits = jnp.asarray([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 1.0, 2.0]], F32)
    draft = jnp.asarray([1, 2, 2], jnp.int32)
    sp = sampling_params(3, temperature=[0.0, 0.0, 1.0])
    for all_greedy in (None, False):
        kept, token = speculative_accept(p_logits, p_logits, draft, sp, row_keys(sp.seed, jnp.int32(0)), all_greedy)
        assert kept.tolist() == [True, False, True] and token.tolist()[:2] == [1, 0]  # p == q: always kept
    sp = sampling_params(2, temperature=0.0)
    kept, token = speculative_accept(p_logits[:2], p_logits[:2], draft[:2], sp, row_keys(sp.seed, jnp.int32(0)), True)
    assert kept.tolist() == [True, False] and token.tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_speculative_step_has_no_loop_of_unknown_length_and_no_conditional(temperature):
    """As test_decode's check of the plain decode loop: with the sampler's branch chosen on the host
    (as ``generate`` does), the speculative loop's program holds no conditional (the draft, the
    verification and the token after it each sampled) and no loop of unknown length but itself."""
    config = SPEC_CONFIGS["csa"]
    b, stops = 2, jnp.zeros((0,), jnp.int32)
    params = jax.eval_shape(lambda: init_params(config, 0))
    cache = jax.eval_shape(lambda: init_cache(config, b, 64, F32, mtp=True))
    sp = sampling_params(b, temperature=temperature)
    _, state = jax.eval_shape(start_speculation, jax.ShapeDtypeStruct((b, config.vocab_size), F32),
                              jax.ShapeDtypeStruct((b, config.hc_mult, config.hidden_size), F32), sp, stops,
                              jnp.int32(8))
    text = speculate_tokens.lower(params, cache, state, sp, jnp.int32(8), stops, config, F32, 4,
                                  all_greedy=temperature == 0).compile().as_text()
    unknown = [line[:120] for line in text.splitlines() if re.search(r"\swhile\(", line)
               and "known_trip_count" not in line]
    assert not re.search(r"\sconditional\(", text)
    assert len(unknown) == 1, unknown  # the speculation loop


# an MTP block of each kind: its cache is a window (swa), or also compressed entries (hca, csa:
# with the indexer); a small vocabulary so that random drafts are kept often enough to matter
SPEC_CONFIGS = {kind: CONFIGS[name].replace(vocab_size=7, mtp_layer_type=kind)
                for name, kind in (("a", "swa"), ("b", "hca"), ("c", "csa"))}


@pytest.mark.parametrize("kind", sorted(SPEC_CONFIGS))
def test_mtp_cache_gives_the_forward_mtp_logits(kind):
    """The main model's streams through ``mtp_chunk``, a prefill of 5 positions then one at a time,
    give ``forward(mtp=True)``'s MTP logits at every position (past window and block boundaries)."""
    config = SPEC_CONFIGS[kind]
    params = sharpened(init_params(config, 0))
    s = 2 * config.sliding_window + 2 * config.ratio.get(kind, 1) + 3
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, s + 1)).astype(np.int32)
    want = np.asarray(forward(params, jnp.asarray(tokens), config, mtp=True)["mtp_logits"])[:, :s]

    @jax.jit
    def step(cache, toks, nxt):
        n = jnp.full((2,), toks.shape[1], jnp.int32)
        x, cache = run_chunk(params, cache, toks, n, config, F32)
        xm, cache = mtp_chunk(params, cache, x, nxt, n, config, F32)
        return logits_at(params, xm, jnp.broadcast_to(jnp.arange(toks.shape[1]), (2, toks.shape[1])), config,
                         mtp=True), cache

    cache = init_cache(config, 2, 128, F32, mtp=True)
    got, cache = step(cache, jnp.asarray(tokens[:, :5]), jnp.asarray(tokens[:, 1:6]))
    errs = [rel(got, want[:, :5])]
    for t in range(5, s):
        got, cache = step(cache, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(tokens[:, t + 1:t + 2]))
        errs.append(rel(got[:, 0], want[:, t]))
    assert max(errs) <= 1e-5, max(errs)
    assert np.asarray(cache["mtp_pos"]).tolist() == [s, s]


@pytest.mark.parametrize("kind", sorted(SPEC_CONFIGS))
def test_greedy_speculation_is_plain_greedy(kind):
    """Greedy output with MTP drafts equals plain greedy output, for rows of different lengths, a stop
    token and an odd budget, over enough steps that drafts are both kept and rejected while the
    window ring wraps and blocks close (so rejected drafts were rolled back correctly)."""
    config = SPEC_CONFIGS[kind]
    params = sharpened(init_params(config, 1))
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (1, 5, 2 * config.sliding_window + 3)]
    n_new = 3 * config.sliding_window + 2 * config.ratio.get(kind, 1) + 1
    kw = dict(temperature=0.0, dtype=F32)
    stop = generate(params, config, prompts, n_new, stop_tokens=[], **kw)[0][n_new // 2]
    for stops, stream_every in (([], 4), ([stop], 16)):
        stats = {}
        want = generate(params, config, prompts, n_new, stop_tokens=stops, **kw)
        got = generate(params, config, prompts, n_new, stop_tokens=stops, speculative="mtp", stats=stats,
                       stream_every=stream_every, **kw)
        assert got == want, stops
        if not stops:
            assert 0 < stats["accepted"] < stats["drafted"], stats  # both paths taken
            assert stats["acceptance_rate"] == stats["accepted"] / stats["drafted"]
    assert any(len(w) < n_new for w in want)  # the stop token ended a row


def test_speculative_sampling_is_exactly_distributed():
    """Sampled with MTP drafts (temperature 0.9, top-k 5 of 7), three new tokens after a fixed prompt,
    over 12,000 rows (each its own draws): the sequences' frequencies against the exact
    p(x1) p(x2 | x1) p(x3 | x1 x2) from the forward's logits on every prefix. Three tokens take every
    path: the first from the prefill, then a kept draft and the token after it, or a rejected draft,
    its replacement and a second draft."""
    config = SPEC_CONFIGS["hca"]
    params = sharpened(init_params(config, 4))
    prompt = [2, 5, 1, 6, 0, 3]
    n, v, t, k = 12_000, config.vocab_size, 0.9, 5
    stats = {}
    got = generate(params, config, [prompt] * n, 3, temperature=t, top_k=k, seed=11, stop_tokens=[], dtype=F32,
                   speculative="mtp", stats=stats)
    assert all(len(g) == 3 for g in got)
    assert 0.1 < stats["acceptance_rate"] < 0.9, stats
    seqs = np.asarray([prompt + list(s) for s in itertools.product(range(v), repeat=2)], np.int32)
    logits = np.asarray(forward(params, jnp.asarray(seqs), config)["logits"], np.float64)
    L = len(prompt)
    probs = {}
    for (x1, x2), row in zip(itertools.product(range(v), repeat=2), logits):
        p1 = np_filtered(row[L - 1], t, k, 1.0)
        p2 = np_filtered(row[L], t, k, 1.0)
        p3 = np_filtered(row[L + 1], t, k, 1.0)
        for x3 in range(v):
            probs[(x1, x2, x3)] = p1[x1] * p2[x2] * p3[x3]
    cells = sorted(probs)
    counts = np.zeros(len(cells))
    index = {c: i for i, c in enumerate(cells)}
    for g in got:
        counts[index[tuple(g)]] += 1
    p = np.asarray([probs[c] for c in cells])
    assert abs(p.sum() - 1) < 1e-9
    assert counts[p == 0].sum() == 0  # nothing outside the filtered support, ever
    chi2, dof = _chi2_ok(counts, p, n)
    assert dof >= 20, dof
    # p = 1e-6 critical value for dof >= 20 (Wilson-Hilferty approximation, within 1% of scipy's)
    z = 4.753
    crit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, dof, crit)


def test_speculative_refused_by_name():
    config = CONFIGS["b"]
    params = init_params(config, 0)
    no_mtp = {key: val for key, val in params.items() if key != "mtp"}
    with pytest.raises(ValueError, match="MTP block"):
        generate(no_mtp, config, [[1, 2]], 4, speculative="mtp")
    with pytest.raises(ValueError, match="speculative must be None or 'mtp'"):
        generate(params, config, [[1, 2]], 4, speculative="medusa")
    with pytest.raises(ValueError, match="log_probs come from plain decoding"):
        generate(params, config, [[1, 2]], 4, speculative="mtp", log_probs=[])
    with pytest.raises(ValueError, match="stream_every"):
        generate(params, config, [[1, 2]], 4, stream_every=0)
    assert last_index(jnp.asarray([0, 1, 2]), 2).tolist() == [[0], [0], [1]]
