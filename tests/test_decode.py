"""The decode cache and extend (v4jax.decode) and generation (v4jax.generate), on the CPU in fp32.

Reference: ``v4jax.model.forward`` on the whole sequence (itself equal to transformers' DeepSeek-V4 to
1e-5, tests/test_parity_model.py), and transformers run on the whole sequence at every step for
greedy generation. Tolerance: max |got - want| / max |want| <= 1e-5.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax
from tests import hf_oracle
from tests.helpers import CONFIGS, rel, sharpened
from v4jax.config import CSA, HCA
from v4jax.decode import cache_bytes, extend, init_cache
from v4jax.generate import decode_tokens, generate
from v4jax.model import forward, init_params
from v4jax.sampling import log_probs, sample, sampling_params

TOLERANCE = 1e-5
F32 = jnp.float32


def _setup(name, s, rows=1, seed=0):
    config = CONFIGS[name]
    params = sharpened(init_params(config, seed))
    tokens = np.random.default_rng(seed + 1).integers(0, config.vocab_size, (rows, s)).astype(np.int32)
    return config, params, tokens


def _extend(params, cache, tokens, config, n_valid=None):
    """extend() in fp32 of each row's first n_valid tokens (all of them by default)."""
    n = jnp.full((tokens.shape[0],), tokens.shape[1] if n_valid is None else n_valid, jnp.int32)
    return extend(params, cache, jnp.asarray(tokens), n, config, F32)


def _boundaries(config):
    """Split points around every block and window boundary of the config."""
    m = sorted({config.ratio[k] for k in (CSA, HCA) if k in config.ratio})
    w = config.sliding_window
    return sorted({1, *(x for r in m for x in (r - 1, r, r + 1, 2 * r - 1, 2 * r)), w - 1, w, w + 1} - {0})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_the_forward(name):
    """prefill(tokens[:k]) then one token at a time gives forward's logits at every position: the
    decode crosses every block, window and ring boundary; k covers the boundaries for the prefill."""
    s = 3 * CONFIGS[name].sliding_window + 5
    config, params, tokens = _setup(name, s, rows=2)
    want = np.asarray(forward(params, jnp.asarray(tokens), config)["logits"])
    width = max(_boundaries(config))  # one compiled prefill: each k is a padded chunk with n_valid = k
    for k in _boundaries(config):
        chunk = np.where(np.arange(width) < k, tokens[:, :width], 0)  # padding that differs from the tokens
        got, cache = _extend(params, init_cache(config, 2, 128, F32), chunk, config, n_valid=k)
        assert rel(got, want[:, k - 1]) <= TOLERANCE, f"prefill of {k} tokens"
    got, cache = _extend(params, init_cache(config, 2, 128, F32), tokens[:, :1], config)
    errs = []
    for t in range(1, s):
        got, cache = _extend(params, cache, tokens[:, t:t + 1], config)
        errs.append(rel(got, want[:, t]))
    assert max(errs) <= TOLERANCE, f"decode: worst {max(errs):.2e} at position {1 + int(np.argmax(errs))}"
    assert np.all(np.asarray(cache["pos"]) == s)


@pytest.mark.parametrize("name", ["a", "b"])
def test_chunked_prefill_equals_one_prefill(name):
    """prefill(a) + extend(b) + extend(c) equals prefill(a + b + c): the logits at each chunk's end and
    the cache's live state (window ring, the compressors' rings, entries of the complete blocks), to
    fp32 rounding: chunks of other widths sum in other orders (the rings' values differed by up to
    1.01e-6 relative on one CPU, whose XLA kernels are XNNPACK's)."""
    config, params, tokens = _setup(name, 37)
    want = np.asarray(forward(params, jnp.asarray(tokens), config)["logits"])
    _, whole = _extend(params, init_cache(config, 1, 64, F32), tokens, config)
    cache = init_cache(config, 1, 64, F32)
    for a, b in ((0, 5), (5, 22), (22, 37)):  # chunks that straddle block and window boundaries
        got, cache = _extend(params, cache, tokens[:, a:b], config)
        assert rel(got, want[:, b - 1]) <= TOLERANCE
    for i, (lc, lw) in enumerate(zip(cache["layers"], whole["layers"])):
        m = config.layer_ratio(i)
        for key in lc:
            ring = key == "window" or key.startswith(("kv_", "gate_"))
            live = slice(None) if ring else slice(0, 37 // m)
            assert rel(lc[key][:, live], lw[key][:, live]) <= 4e-6, (i, key)


def test_a_decode_step_writes_the_rings_in_place():
    """One token a row: the rings are not concatenated with the new token (window [b, W + 1, c], each
    compressor's projections [b, R + 1, k c]) and nothing is projected but the new token (the
    compressors' rings keep each token's projections: no block is projected again); a chunk of two
    tokens takes the chunk path, which concatenates them. (That decode gives forward's logits at
    every position is test_prefill_then_decode_equals_the_forward.)"""
    config, params, _ = _setup("a", 1)
    cache = init_cache(config, 2, 64, F32)
    w, c, d = config.sliding_window, config.head_dim, config.hidden_size

    def program(t):
        return extend.lower(params, cache, jnp.zeros((2, t), jnp.int32), jnp.ones((2,), jnp.int32), config,
                            F32).as_text()

    def concatenated(text, shape):
        return any("concatenate" in line and f"-> tensor<{shape}xf32>" in line for line in text.splitlines())

    one, two = program(1), program(2)
    m_csa, m_hca, c_i = config.ratio[CSA], config.ratio[HCA], config.index_head_dim
    rings = [f"2x{w + 1}x{c}", f"2x{2 * m_csa + 1}x{2 * c}", f"2x{2 * m_csa + 1}x{2 * c_i}", f"2x{m_hca + 1}x{c}"]
    assert not any(concatenated(one, shape) for shape in rings)
    assert concatenated(two, f"2x{w + 2}x{c}")  # the window ring unrolled, then the chunk's two keys
    assert concatenated(two, f"2x{m_hca + 2}x{c}")  # an HCA compressor's ring, then the chunk's rows

    def projected_rows(text):  # the row counts of every projection of x [2, rows, d]
        return {int(r) for r in re.findall(rf"dot_general.*\(tensor<2x(\d+)x{d}xf32>, tensor<\d+x{d}xf32>\)", text)}

    assert projected_rows(one) == {1} and projected_rows(two) == {1, 2}  # two: the head takes the last one


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_decode_step_has_no_loop_of_unknown_length_and_no_conditional(temperature):
    """XLA on a GPU reads the predicate of a conditional, and of each iteration of a loop whose trip
    count it does not know, on the host: inside the decode loop that is a host round trip per layer
    and step. The decode loop's compiled program, greedy or sampled as ``generate`` runs it, may hold
    only the token loop itself and loops of known length (the mHC Sinkhorn's on the CPU): the
    indexer's top-k over a cache that fits one key block takes no loop, and the sampler takes the
    branch ``generate`` chose on the host. Without that choice the sampler keeps its conditional."""
    config = CONFIGS["a"]
    assert CSA in {config.layer_type(i) for i in range(config.num_hidden_layers)}
    params = jax.eval_shape(lambda: init_params(config, 0))
    cache = jax.eval_shape(lambda: init_cache(config, 2, 64, F32))
    sp = sampling_params(2, temperature=temperature)

    def program(all_greedy):
        return decode_tokens.lower(params, cache, jax.ShapeDtypeStruct((2, config.vocab_size), F32), sp,
                                   jnp.int32(0), jnp.ones((2,), bool), jnp.int32(8), jnp.zeros((0,), jnp.int32),
                                   config, F32, 8, all_greedy=all_greedy).compile().as_text()

    text = program(temperature == 0)
    unknown = [line[:120] for line in text.splitlines() if re.search(r"\swhile\(", line)
               and "known_trip_count" not in line]
    assert not re.search(r"\sconditional\(", text)
    assert len(unknown) == 1, unknown  # the token loop
    assert re.search(r"\sconditional\(", program(None))


def test_ragged_rows_equal_each_row_alone():
    """Rows of different prompt lengths in one batch generate what each generates alone (greedy), and
    a batch row's logits equal the forward of its own sequence."""
    config, params, _ = _setup("a", 1)
    m = config.ratio[CSA]
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (1, 3, m, config.sliding_window + 5)]
    kw = dict(temperature=0.0, stop_tokens=[], dtype=F32)
    n_new = 2 * config.sliding_window
    together = generate(params, config, prompts, n_new, **kw)
    for p, got in zip(prompts, together):
        assert got == generate(params, config, [p], n_new, **kw)[0]
    # full recompute on each whole sequence, all in one (causal) forward, the rows zero-padded at the end
    seqs = np.zeros((len(prompts), max(map(len, prompts)) + n_new), np.int32)
    for row, (p, got) in enumerate(zip(prompts, together)):
        seqs[row, :len(p) + n_new] = p + got
    logits = np.asarray(forward(params, jnp.asarray(seqs), config)["logits"])
    for row, (p, got) in enumerate(zip(prompts, together)):
        assert list(np.argmax(logits[row, len(p) - 1:len(p) - 1 + n_new], axis=-1)) == got


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_generation_equals_full_recompute_of_the_reference(name, tmp_path):
    """Greedy tokens from the cache equal transformers' greedy run on the whole sequence at every step
    (no cache), for a model loaded from the reference's checkpoint; both ends have margins."""
    config = CONFIGS[name]
    reference = hf_oracle.make_reference(config, seed=3, directory=tmp_path)
    with pytest.warns(UserWarning, match="no mtp"):
        model = v4jax.from_pretrained(tmp_path, dtype="float32")
    prompt = list(np.random.default_rng(4).integers(0, config.vocab_size, 6))
    n_new = 3 * config.sliding_window  # blocks close and the ring wraps during decode
    got = generate(model.params, config, [prompt], n_new, temperature=0.0, stop_tokens=[], dtype=F32)[0]
    seq = list(prompt)
    for _ in range(n_new):
        logits = hf_oracle.reference_logits(reference, np.asarray([seq]))[0, -1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-4 * np.abs(logits).max(), "a near tie: pick another seed"
        seq.append(int(np.argmax(logits)))
    assert got == seq[len(prompt):]


def test_stop_tokens_end_rows_independently():
    config, params, _ = _setup("b", 1)
    prompts = [[5, 6, 7], [8]]
    free = generate(params, config, prompts, 12, temperature=0.0, stop_tokens=[], dtype=F32)
    stop = free[0][3]
    got = generate(params, config, prompts, 12, temperature=0.0, stop_tokens=[stop], dtype=F32)
    assert got[0] == free[0][:free[0].index(stop)]
    assert got[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])


def test_decode_loop_compiles_once():
    """One compiled decode loop across steps, rows' states, sampling settings and lengths (a batch of
    3 rows, which no other test compiles)."""
    config, params, _ = _setup("b", 1)
    before = decode_tokens._cache_size()
    generate(params, config, [[1, 2, 3], [4], [5, 6]], 9, temperature=[0.0, 0.8, 1.0], top_k=[0, 5, 2],
             seed=[1, 2, 3], dtype=F32, stop_tokens=[])
    assert decode_tokens._cache_size() - before == 1
    generate(params, config, [[9, 8], [7, 6, 5, 4], [3]], 21, temperature=[1.3, 0.5, 0.0], top_p=[0.9, 0.5, 1.0],
             dtype=F32, stop_tokens=[])
    assert decode_tokens._cache_size() - before == 1


def _host_loop(params, config, prompts, n_new, stops, **sampling):
    """The reference: generation one step at a time from the host (how v4jax generated before the loop
    moved onto the device): prefill in one chunk, then per step sample with the step's key, append
    the tokens of the rows still running, and end a row at a stop token."""
    b = len(prompts)
    sp = sampling_params(b, **sampling)
    chunk = np.zeros((b, max(map(len, prompts))), np.int32)
    for i, p in enumerate(prompts):
        chunk[i, :len(p)] = p
    n = jnp.asarray([len(p) for p in prompts], jnp.int32)
    logits, cache = extend(params, init_cache(config, b, 256, F32), jnp.asarray(chunk), n, config, F32)
    out, logps, active = [[] for _ in range(b)], [[] for _ in range(b)], np.ones(b, bool)
    for step in range(n_new):
        tokens = np.asarray(sample(logits, sp, jnp.int32(step)))
        logp = np.asarray(log_probs(logits, sp, jnp.asarray(tokens)))
        active &= ~np.isin(tokens, stops)
        for i in np.flatnonzero(active):
            out[i].append(int(tokens[i]))
            logps[i].append(float(logp[i]))
        logits, cache = extend(params, cache, jnp.asarray(tokens[:, None]), jnp.asarray(active, jnp.int32), config,
                               F32)
    return out, logps


@pytest.mark.parametrize("stream_every", [1, 5, 64])
def test_the_device_loop_equals_one_step_at_a_time(stream_every):
    """``generate`` (its steps in a jax.lax.while_loop, back on the host every ``stream_every`` steps)
    gives the host loop's tokens, greedy and seeded sampling, rows of different lengths, a stop
    token that ends rows at different steps; ``on_tokens`` sees each position's tokens in order, and
    ``log_probs`` are ``sampling.log_probs`` of each drawn token (1e-5; 0 for greedy rows)."""
    config, params, _ = _setup("a", 1)
    rng = np.random.default_rng(11)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (1, 6, 13)]
    free = _host_loop(params, config, prompts, 24, [], temperature=0.0)[0]
    stop = free[1][9]  # ends row 1 at step 9 at the latest, the others where it comes up
    for sampling in (dict(temperature=0.0), dict(temperature=[1.0, 0.0, 0.7], top_k=[0, 0, 20], seed=[4, 5, 6])):
        want, want_logp = _host_loop(params, config, prompts, 24, [stop], **sampling)
        seen, got_logp = [], []
        got = generate(params, config, prompts, 24, stop_tokens=[stop], dtype=F32, stream_every=stream_every,
                       on_tokens=seen.append, log_probs=got_logp, **sampling)
        assert got == want, sampling
        for g, w in zip(got_logp, want_logp):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert [[t for t in row if t is not None] for row in zip(*seen)] == want
        assert len(seen) == max(map(len, want))
    assert len(want[1]) <= 9  # the stop token did end a row early


def test_sampling_reproducible_by_seed():
    config, params, _ = _setup("b", 1)
    kw = dict(temperature=1.0, stop_tokens=[], dtype=F32)
    a = generate(params, config, [[3, 4]], 16, seed=7, **kw)
    assert a == generate(params, config, [[3, 4]], 16, seed=7, **kw)
    assert a != generate(params, config, [[3, 4]], 16, seed=8, **kw)


def test_bad_generation_input_is_refused():
    config, params, _ = _setup("b", 1)
    for prompts, match in (([], "non-empty list"), ([[]], r"prompts\[0\]"), ([[1, config.vocab_size]],
                                                                               r"prompts\[0\]\[1\]")):
        with pytest.raises(ValueError, match=match):
            generate(params, config, prompts, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(params, config, [[1]], 0)
    with pytest.raises(ValueError, match="temperature"):
        generate(params, config, [[1]], 2, temperature=-1.0)


def test_cache_bytes_from_the_shapes():
    """cache_bytes counts what init_cache allocates, and its growing part is per CSA layer 2 x 1/m of a
    head (entries and indexer keys) and per HCA layer 1/m of a head, per token."""
    config = CONFIGS["c"]
    got = cache_bytes(config, 1024, dtype=F32)
    cache = init_cache(config, 1, 1024, F32)
    assert got["total"] == sum(x.nbytes for x in jax.tree.leaves(cache))
    want = 4 * 1024 * (config.head_dim // 4 + config.index_head_dim // 4 + config.head_dim // 16)
    assert got["growing"] == want


def test_model_generate_chat_and_the_cli(tmp_path, capsys):
    """The front door: Model.generate (token lists or strings), Model.chat (the V4 chat format with the
    DeepSeek tokenizer) and v4jax-generate on a saved checkpoint all give the function's tokens."""
    from v4jax.chat import encode_chat_tokens
    from v4jax.cli.generate import main
    from v4jax.tokenizer import load_tokenizer

    config = CONFIGS["b"].replace(vocab_size=259)  # the byte tokenizer's ids
    model = v4jax.Model(config, sharpened(init_params(config, 0)), jnp.dtype(F32))
    tok = load_tokenizer("bytes")
    ids = [tok.bos_id, *tok.encode("Hello")]  # a text prompt begins with BOS, as training documents do
    want = generate(model.params, config, [ids], 6, temperature=0.0, dtype=F32)[0]
    assert model.generate(["Hello"], 6, temperature=0.0, tokenizer="bytes")[0] == want
    assert model.generate([ids], 6, temperature=0.0)[0] == want
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(["Hello"], 6)  # the DeepSeek tokenizer's ids do not fit this vocabulary

    model.save(tmp_path / "ckpt")
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "6",
                 "--temperature", "0", "--tokenizer", "bytes", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == tok.decode(want) + "\n"
    # speculative decoding through the same doors (greedy: the same tokens), its acceptance rate reported
    stats = {}
    assert model.generate(["Hello"], 6, temperature=0.0, tokenizer="bytes", speculative="mtp", stats=stats)[0] == want
    assert stats["drafted"] > 0
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "6",
                 "--temperature", "0", "--tokenizer", "bytes", "--dtype", "float32", "--speculative", "mtp",
                 "--stream-every", "2"]) == 0
    out = capsys.readouterr()
    assert out.out == tok.decode(want) + "\n" and "acceptance rate" in out.err

    big = CONFIGS["b"].replace(vocab_size=129280)
    chat_model = v4jax.Model.init(big, seed=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = chat_model.chat(messages, mode="think", max_new_tokens=4, temperature=0.0)
    prompt = encode_chat_tokens(messages, load_tokenizer("deepseek"), "think")
    new = chat_model.generate([prompt], 4, temperature=0.0)[0]
    assert reply["tokens"][:len(new)] == new and set(reply) >= {"content", "reasoning_content", "finished"}
    fast = chat_model.chat(messages, mode="think", max_new_tokens=4, temperature=0.0, speculative="mtp")
    assert fast["tokens"] == reply["tokens"] and 0 <= fast["acceptance_rate"] <= 1


def test_sharded_generation_equals_unsharded():
    """On 8 devices (data 2 x expert 2 x tensor 2: parameters by v4jax's rules, the cache split by
    rows) prefill logits and greedy tokens equal the single-device run."""
    from v4jax.decode import cache_shardings
    from v4jax.schema import param_shardings

    config = CONFIGS["a"]
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "tensor"))
    plain = v4jax.Model(config, sharpened(init_params(config, 0)), jnp.dtype(F32))
    sharded = v4jax.Model(config, plain.params, jnp.dtype(F32), mesh=mesh)
    mesh = sharded.mesh  # with the axes the mesh left out, of size 1
    sharded.params = jax.device_put(plain.params, param_shardings(plain.params, mesh, config))
    rng = np.random.default_rng(8)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (3, 9, 1, 12)]
    tokens = np.zeros((4, 12), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    n_valid = jnp.asarray([len(p) for p in prompts], jnp.int32)
    want, _ = extend(plain.params, init_cache(config, 4, 64, F32), jnp.asarray(tokens), n_valid, config, F32)
    cache = init_cache(config, 4, 64, F32)
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    got, cache = extend(sharded.params, cache, jnp.asarray(tokens), n_valid, config, F32)
    assert rel(got, want) <= TOLERANCE
    assert cache["layers"][1]["entries"].sharding.spec[0] == ("data", "expert")  # split by rows
    kw = dict(temperature=0.0, stop_tokens=[])
    assert sharded.generate(prompts, 20, **kw) == plain.generate(prompts, 20, **kw)


def test_fp8_entries_store_the_quantised_entries():
    """``fp8_entries``: the compressed entries' non-RoPE channels as E4M3 codes with a power-of-two
    scale per 64 channels (spec §2.11), the RoPE channels as they are. The first compressed layer's
    stored entries decode to the fp32 cache's entries quantised by the numpy reference written from
    the spec (tests/test_quant.py), after the prefill and after decode steps; later layers see the
    quantised entries of earlier ones, so their logits are only close to the fp32 cache's."""
    from tests.test_quant import ref_quantize
    from v4jax.quant import decode_rows

    config, params, tokens = _setup("a", 48)
    i = next(j for j in range(config.num_hidden_layers) if config.layer_type(j) in (CSA, HCA))
    m, r = config.layer_ratio(i), config.qk_rope_head_dim
    c32, c8 = init_cache(config, 1, 64, F32), init_cache(config, 1, 64, F32, fp8_entries=True)
    for a, b in ((0, 40), (40, 41), (41, 48)):  # a prefill, a decode step, a chunk
        want, c32 = _extend(params, c32, tokens[:, a:b], config)
        got, c8 = _extend(params, c8, tokens[:, a:b], config)
        assert 0 < rel(got, want) <= 2e-2, (b, rel(got, want))
        n = b // m  # the blocks complete so far
        e32, st = np.asarray(c32["layers"][i]["entries"])[0, :n], c8["layers"][i]["entries"]
        assert st["nope"].dtype == jnp.float8_e4m3fn and st["scale"].dtype == jnp.float8_e8m0fnu
        np.testing.assert_array_equal(np.asarray(decode_rows(st["nope"], st["scale"], 64))[0, :n],
                                      ref_quantize(e32[:, :-r], (1, 64), "fp8").astype(np.float32))
        np.testing.assert_array_equal(np.asarray(st["rope"])[0, :n], e32[:, -r:])


def test_fp8_entries_bytes_and_generation():
    """The FP8 cache's growing part per compressed layer and token: c - r code bytes, one scale byte
    per 64 of them and the RoPE channels in the cache dtype (the indexer's keys unchanged); greedy
    generation runs on it through Model.generate."""
    config = CONFIGS["c"]
    c, r = config.head_dim, config.qk_rope_head_dim
    got = cache_bytes(config, 1024, dtype=F32, fp8_entries=True)
    assert got["total"] == sum(x.nbytes for x in jax.tree.leaves(init_cache(config, 1, 1024, F32, True)))
    entry = (c - r) + -(-(c - r) // 64) + 4 * r
    assert got["growing"] == 1024 // 4 * (entry + 4 * config.index_head_dim) + 1024 // 16 * entry  # CSA, HCA
    model = v4jax.Model(config, sharpened(init_params(config, 0)), jnp.dtype(F32))
    out = model.generate([[5, 6, 7]], 8, temperature=0.0, stop_tokens=[], fp8_cache=True)
    assert len(out[0]) == 8
