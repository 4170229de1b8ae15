"""Sampling (inference-design §6.6): the greedy limits equal argmax, per-row settings, seeded keys that do
not depend on the batch, a chi-square fit against the filtered distribution written out in numpy, no
recompilation when the values change, and bad arguments refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CHI2_1E6, np_filtered
from v4jax.sampling import SamplingParams, log_probs, row_keys, sample, sample_with_log_probs, sampling_params

rng = np.random.default_rng(0)
sample_jit = jax.jit(sample)
# many steps at once: step [S, B] -> tokens [S, B]
steps_jit = jax.jit(jax.vmap(sample, in_axes=(None, None, 0, None)))
log_probs_jit = jax.jit(log_probs)
B, V = 16, 1000  # the argmax tests share one shape (one compile)
B2, V2 = 6, 300  # and the key tests another


def _logits(b, v, scale=3.0):
    return jnp.asarray(rng.normal(size=(b, v)) * scale, jnp.float32)


def _i32(x):
    return jnp.asarray(x, jnp.int32)


# ---------------------------------------------------------------------------------------------------
# limits that must equal argmax


def test_greedy_is_argmax_with_ties_to_lowest_id():
    x = _logits(B, V)
    x = x.at[3, 7].set(50.0).at[3, 500].set(50.0)  # a tie: the lowest id wins, as in jnp.argmax
    p = sampling_params(B, temperature=0.0, top_k=7, top_p=0.3, seed=rng.integers(0, 2**32, B))
    for step in range(3):
        np.testing.assert_array_equal(sample_jit(x, p, _i32(step)), jnp.argmax(x, -1))
    assert int(sample_jit(x, p, _i32(0))[3]) == 7
    xb = x.astype(jnp.bfloat16)  # bf16 logits: still exactly jnp.argmax
    np.testing.assert_array_equal(sample_jit(xb, p, _i32(0)), jnp.argmax(xb, -1))


def test_tiny_temperature_is_argmax():
    x = _logits(B, V)
    top = rng.integers(0, V, B)
    x = x.at[np.arange(B), top].set(x.max(-1) + 1e-3)  # a margin, so T -> 0 cannot flip the argmax by rounding
    p = sampling_params(B, temperature=1e-6, seed=np.arange(B))
    for step in range(3):
        np.testing.assert_array_equal(sample_jit(x, p, _i32(step)), top)


def test_top_k_1_is_argmax_even_with_ties():
    x = _logits(B, V, scale=1.0)
    x = x.at[5, 9].set(40.0).at[5, 900].set(40.0)
    p = sampling_params(B, temperature=5.0, top_k=1, seed=np.arange(B))
    for step in range(3):
        np.testing.assert_array_equal(sample_jit(x, p, _i32(step)), jnp.argmax(x, -1))


@pytest.mark.parametrize("shape", [(B, V), (2, 129280)])
def test_tiny_top_p_is_argmax(shape):
    x = _logits(*shape, scale=1.0)
    x = x.at[0, 11].set(30.0).at[0, 12].set(30.0)  # a tie at the top: the nucleus keeps the lowest id
    p = sampling_params(shape[0], temperature=2.0, top_p=1e-6, seed=np.arange(shape[0]) + 1)
    for step in range(2):
        np.testing.assert_array_equal(sample_jit(x, p, _i32(step)), jnp.argmax(x, -1))


# ---------------------------------------------------------------------------------------------------
# per row, seeds, keys

STEPS = 16


def _steps(first):
    return _i32(first) + jnp.arange(STEPS, dtype=jnp.int32)[:, None]  # [STEPS, B2]


def test_greedy_row_next_to_sampled_row():
    x = jnp.broadcast_to(_logits(1, V2, scale=0.5), (B2, V2))
    p = sampling_params(B2, temperature=[0.0, 1.0, 0.0, 1.0, 0.0, 1.0], top_k=[0, 0, 3, 0, 0, 0], seed=5)
    toks = np.asarray(steps_jit(x, p, _steps(np.zeros(B2)), _i32(np.arange(B2))))  # [STEPS, B2]
    am = int(jnp.argmax(x[0]))
    assert (toks[:, [0, 2, 4]] == am).all()
    for b in (1, 3, 5):  # nearly flat logits at T=1: the sampled rows vary, and differ from each other
        assert len(set(toks[:, b].tolist())) > 8
    assert (toks[:, 1] != toks[:, 3]).any() and (toks[:, 3] != toks[:, 5]).any()


def test_deterministic_by_seed_and_independent_of_the_batch():
    x = _logits(B2, V2, scale=1.0)
    p = sampling_params(B2, temperature=[1.0, 0.7, 0.0, 1.3, 1.0, 0.9], top_k=[0, 20, 0, 0, 5, 0],
                        top_p=[1.0, 0.9, 1.0, 0.95, 1.0, 0.5], seed=[11, 12, 13, 14, 15, 16])
    rows = _i32([3, 8, 1, 40, 2, 7])
    steps = _steps([0, 5, 2, 9, 9, 1])
    full = steps_jit(x, p, steps, rows)  # [STEPS, B2]
    np.testing.assert_array_equal(full, steps_jit(x, p, steps, rows))
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    for b in range(B2):  # a row alone, with its own row id, draws what it drew in the batch
        alone = steps_jit(x[b:b + 1], take(p, slice(b, b + 1)), steps[:, b:b + 1], rows[b:b + 1])
        np.testing.assert_array_equal(alone[:, 0], full[:, b])
    perm = np.array([4, 0, 5, 2, 1, 3])  # and a permuted batch permutes the tokens
    np.testing.assert_array_equal(sample_jit(x[perm], take(p, perm), steps[0][perm], rows[perm]), full[0][perm])
    # another seed, or another row id, gives other draws
    sampled = np.asarray(p.temperature) > 0
    other = steps_jit(x, p._replace(seed=p.seed + 1000), steps, rows)
    assert (other != full)[:, sampled].mean() > 0.3
    other = steps_jit(x, p, steps, rows + 1)
    assert (other != full)[:, sampled].mean() > 0.3


def test_scalar_step_equals_broadcast_step_and_default_row_ids():
    x = _logits(B2, V2)
    p = sampling_params(B2, temperature=1.0, seed=3)
    np.testing.assert_array_equal(sample_jit(x, p, _i32(7)), sample_jit(x, p, _i32(np.full(B2, 7)), _i32(np.arange(B2))))


def test_key_convention_unfiltered_is_gumbel_max():
    """The documented key: with no filter, token = argmax(logits/T + gumbel(fold_in(fold_in(PRNGKey(seed), row), step)))."""
    x = _logits(B2, V2, scale=1.0)
    p = sampling_params(B2, temperature=0.8, seed=[0, 1, 2**32 - 1, 77, 77, 5])
    rows, step = _i32([0, 9, 3, 3, 4, 0]), _i32([0, 1, 2, 3, 3, 1000])
    keys = jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s), r), t))(p.seed, rows, step)
    want = jnp.argmax(x / 0.8 + jax.vmap(lambda k: jax.random.gumbel(k, (V2,), jnp.float32))(keys), -1)
    np.testing.assert_array_equal(sample_jit(x, p, step, rows), want)
    np.testing.assert_array_equal(jax.vmap(jax.random.key_data)(row_keys(p.seed, step, rows)), keys)


def test_top_k_ties_keep_the_lowest_ids():
    x = jnp.zeros((B2, V2)).at[:, [1, 2, 3, 5]].set(2.0)  # four tokens tied at the top
    p = sampling_params(B2, temperature=1.0, top_k=2)
    toks = np.asarray(steps_jit(x, p, _steps(np.zeros(B2)), _i32(np.arange(B2))))
    assert set(toks.ravel().tolist()) == {1, 2}  # HF would keep all four ties


# ---------------------------------------------------------------------------------------------------
# the distribution

Z = np.array([0.3, 2.0, -1.0, 1.2, 0.9, -0.4, 1.6, -2.5])
T = 0.7
N = 20_000
# (top_k, top_p, the kept token ids written out by hand); sorted by probability the ids are 1 6 3 4 0 5 2 7,
# with cumulative mass at T=0.7 .449 .703 .846 .939 .979 ... and, after top-4, .478 .748 .901 1:
# top_p=0.8 keeps {1, 6, 3}; top-4 then top_p=0.89 keeps {1, 6, 3} where top-p on the unfiltered
# probabilities would keep four (so the order of the filters is tested).
CASES = [(0, 1.0, {0, 1, 2, 3, 4, 5, 6, 7}), (5, 1.0, {1, 6, 3, 4, 0}), (0, 0.8, {1, 6, 3}), (4, 0.89, {1, 6, 3})]
# With the fixed seeds the chi-square tests are deterministic; a change of RNG would fail one with
# probability 1e-6 per case (CHI2_1E6).


def test_chi_square_against_the_filtered_distribution():
    b = N * len(CASES)
    logits = jnp.broadcast_to(jnp.asarray(Z, jnp.float32), (b, len(Z)))
    p = sampling_params(b, temperature=T, top_k=np.repeat([c[0] for c in CASES], N),
                        top_p=np.repeat([c[1] for c in CASES], N), seed=1234)
    toks, logp = jax.jit(sample_with_log_probs)(logits, p, jnp.int32(0))
    np.testing.assert_array_equal(toks, sample_jit(logits, p, jnp.int32(0)))
    toks, logp = np.asarray(toks).reshape(len(CASES), N), np.asarray(logp).reshape(len(CASES), N)
    for (top_k, top_p, kept), t, lp in zip(CASES, toks, logp):
        want = np_filtered(Z, T, top_k, top_p)
        assert set(np.flatnonzero(want > 0).tolist()) == kept  # the reference agrees with the hand-written set
        counts = np.bincount(t, minlength=len(Z))
        assert set(np.flatnonzero(counts).tolist()) <= kept  # nothing outside the kept set, ever
        idx = sorted(kept)
        expected = N * want[idx]
        assert expected.min() >= 5
        chi2 = float(((counts[idx] - expected) ** 2 / expected).sum())
        assert chi2 < CHI2_1E6[len(idx) - 1], (top_k, top_p, chi2, counts, expected)
        np.testing.assert_allclose(lp, np.log(want[t]), rtol=1e-5, atol=1e-6)  # log-probs of the draws


def test_log_probs():
    logits = jnp.asarray(np.stack([Z, Z, Z]), jnp.float32)
    p = sampling_params(3, temperature=[T, T, 0.0], top_k=[5, 0, 0], top_p=[1.0, 0.8, 1.0])
    want0, want1 = np_filtered(Z, T, 5, 1.0), np_filtered(Z, T, 0, 0.8)
    with np.errstate(divide="ignore"):
        for tok in range(len(Z)):
            got = log_probs_jit(logits, p, jnp.full((3,), tok, jnp.int32))
            np.testing.assert_allclose(got[:2], np.log([want0[tok], want1[tok]]), rtol=1e-5, atol=1e-6)
            assert got[2] == (0.0 if tok == int(np.argmax(Z)) else -np.inf)


# ---------------------------------------------------------------------------------------------------
# compile once


def test_no_recompilation_when_values_change():
    traces = []

    @jax.jit
    def f(x, p, step, rows):
        traces.append(1)
        return sample(x, p, step, rows)

    x = _logits(4, 64)
    rows = jnp.arange(4, dtype=jnp.int32)
    settings = [dict(), dict(temperature=0.0), dict(temperature=[0.0, 0.5, 1e-6, 2.0]),
                dict(top_p=0.3, top_k=[0, 1, 5, 64]), dict(top_k=7, seed=[1, 2, 3, 2**32 - 1]),
                dict(temperature=1.5, top_p=[1.0, 0.5, 0.9, 0.01], top_k=3, seed=9)]
    for i, kw in enumerate(settings):
        f(x, sampling_params(4, **kw), jnp.int32(i), rows).block_until_ready()
    assert len(traces) == 1


# ---------------------------------------------------------------------------------------------------
# refused arguments


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), r"temperature must be a finite number >= 0.*-0\.1"),
    (dict(temperature=[1.0, float("nan")]), r"temperature must be .*nan.*row 1"),
    (dict(temperature=float("inf")), r"temperature must be a finite number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\].*0\.0"),
    (dict(top_p=[0.5, 1.5]), r"top_p must be in \(0, 1\].*1\.5.*row 1"),
    (dict(top_k=-1), r"top_k must be an integer in \[0, .*-1"),
    (dict(top_k=2.5), r"top_k must be an integer.*2\.5"),
    (dict(top_k=2**31), r"top_k must be an integer in \[0, 2147483647\].*2147483648"),
    (dict(seed=-3), r"seed must be an integer in \[0, 2\*\*32\).*-3"),
    (dict(seed=2**32), r"seed must be an integer in \[0, 2\*\*32\).*4294967296"),
    (dict(top_k=[1, 2, 3]), r"top_k must be a scalar or have one value per row \(batch=2\)"),
    (dict(seed="a"), r"seed must be numeric"),
    (dict(top_k=True), r"top_k must be numeric"),
])
def test_bad_arguments_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling_params(2, **kwargs)


def test_bad_batch_and_shapes_refused():
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        sampling_params(0)
    p = sampling_params(2)
    with pytest.raises(ValueError, match=r"params.temperature must have shape \(3,\)"):
        sample(jnp.zeros((3, 8)), p, 0)
    with pytest.raises(ValueError, match=r"row_ids must have shape \(2,\)"):
        sample(jnp.zeros((2, 8)), p, 0, jnp.zeros((3,), jnp.int32))
    assert isinstance(p, SamplingParams) and p.top_k.dtype == jnp.int32 and p.seed.dtype == jnp.uint32
    ok = sampling_params(2, top_k=4.0, seed=np.uint32(2**32 - 1))  # integral floats and uint32 are accepted
    assert ok.top_k.tolist() == [4, 4] and ok.seed.tolist() == [2**32 - 1] * 2
