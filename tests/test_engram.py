"""Engram (v4jax/engram.py): hashing against the published algorithm written out per token, the
no-op start, gradients into the tables, sharding, the optimizer group, the input pipeline, checkpoints
and conversion, config refusal, and the needle-in-a-haystack evaluation."""

import json
import unicodedata

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import v4jax
from tests.helpers import CONFIGS, batch, rel, write_checkpoint
from v4jax import optim
from v4jax.config import ConfigError, ModelConfig
from v4jax.engram import PAD_TOKEN, Hasher, compression_map, table_primes, table_rows
from v4jax.model import forward, init_params
from v4jax.parallel import ParallelConfig, batch_sharding, make_mesh
from v4jax.schema import param_shardings, shard_like_params
from v4jax.trainer import TrainConfig, init_state, make_optimizer, make_train_step

ENGRAM = {"layers": [1, 2], "max_ngram": 3, "heads": 3, "head_dim": 8, "table_size": 53, "tokenizer": "bytes"}
BASE = CONFIGS["a"].replace(vocab_size=259, n_routed_experts=8)
CONFIG = BASE.replace(engram=ENGRAM)
V41 = BASE.replace(engram={**ENGRAM, "form": "v4.1"})


def _packed(rng, lengths, vocab=259):
    tokens = rng.integers(3, vocab, size=sum(lengths))
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    return tokens[None].astype(np.int32), seg[None].astype(np.int32), pos[None].astype(np.int32)


def _is_prime(n):
    return n > 1 and all(n % f for f in range(2, int(n**0.5) + 1))


# --------------------------------------------------------------------------------------------------
# Addresses


def test_byte_compression_folds_case_and_keeps_partial_characters_apart():
    """Tokens whose text normalises alike (NFKC, NFD, no accents, lowercase) share an id; a byte that
    is not a character alone (UTF-8 lead or continuation) keeps its own."""
    p = compression_map("bytes", 259)
    byte = lambda c: ord(c) + 3  # noqa: E731  (the byte tokenizer's id)
    assert p[byte("A")] == p[byte("a")] and p[byte("Z")] == p[byte("z")] and p[byte("a")] != p[byte("b")]
    assert len({p[0xC3 + 3], p[0xA9 + 3], p[0x80 + 3]}) == 3  # bytes of "é": no character alone
    ascii_letters = {unicodedata.normalize("NFKC", chr(c)).lower() for c in range(32, 127)}
    assert len({int(p[c + 3]) for c in range(32, 127)}) == len(ascii_letters)
    assert (compression_map("none", 7) == np.arange(7)).all()


def test_table_primes_follow_the_published_rule():
    """Successive primes >= table_size in (layer, order, head) order, none used twice; the tables
    padded to whole multiples of 1024 rows."""
    cfg = CONFIG.engram
    primes = [p for layer in table_primes(cfg) for order in layer for p in order]
    assert len(primes) == len(cfg.layers) * (cfg.max_ngram - 1) * cfg.heads
    assert all(_is_prime(p) for p in primes) and primes == sorted(set(primes))
    assert primes[0] == next(n for n in range(cfg.table_size, 10 * cfg.table_size) if _is_prime(n))
    between = [n for n in range(primes[0], primes[-1] + 1) if _is_prime(n)]
    assert between == primes  # no prime skipped
    assert table_rows(cfg) % 1024 == 0 and table_rows(cfg) >= max(sum(sum(o) for o in layer)
                                                                  for layer in table_primes(cfg))


def test_hash_ids_match_the_algorithm_token_by_token():
    """The demo's multiplicative-XOR hash, written out per token with Python integers: the order-n
    suffix of compressed ids inside the document (the pad token's id before its start), each id
    times its odd multiplier, XORed, modulo the head's prime, plus the head's offset."""
    rng = np.random.default_rng(0)
    tokens, seg, _ = _packed(rng, [5, 1, 17, 9])
    got = Hasher(CONFIG)(tokens, seg)
    cfg = CONFIG.engram
    p = compression_map(cfg.tokenizer, CONFIG.vocab_size)
    vocab = int(p.max()) + 1
    for slot, layer in enumerate(cfg.layers):
        r = np.random.default_rng(cfg.seed + 10007 * layer)
        mult = [int(m) * 2 + 1 for m in r.integers(0, (2**63 - 1) // vocab // 2, size=cfg.max_ngram, dtype=np.int64)]
        primes = table_primes(cfg)[slot]
        offsets = np.concatenate([[0], np.cumsum([q for order in primes for q in order])[:-1]])
        for t in range(tokens.shape[1]):
            want = []
            for n in range(2, cfg.max_ngram + 1):
                mix = 0
                for i in range(n):
                    inside = t - i >= 0 and seg[0, t - i] == seg[0, t]
                    mix ^= int(p[tokens[0, t - i]] if inside else p[PAD_TOKEN]) * mult[i]
                for k, q in enumerate(primes[n - 2]):
                    want.append(mix % q + int(offsets[(n - 2) * cfg.heads + k]))
            assert list(got[0, t, slot]) == want, (layer, t)


# --------------------------------------------------------------------------------------------------
# The model


def _without_engram(params):
    out = jax.tree.map(lambda a: a, params)
    for layer in out["layers"]:
        layer.pop("engram", None)
    return out


@pytest.mark.parametrize("config", [CONFIG, V41], ids=["paper", "v4.1"])
def test_a_new_engram_is_a_no_op(config):
    rng = np.random.default_rng(1)
    tokens, seg, pos = _packed(rng, [20, 13])
    ids = Hasher(config)(tokens, seg)
    params = init_params(config, seed=2)
    got = forward(params, tokens, config, positions=pos, segment_ids=seg, mtp=True, engram_ids=ids)
    want = forward(_without_engram(params), tokens, BASE, positions=pos, segment_ids=seg, mtp=True)
    np.testing.assert_array_equal(got["logits"], want["logits"])
    np.testing.assert_array_equal(got["mtp_logits"], want["mtp_logits"])


@pytest.mark.parametrize("config", [CONFIG, V41], ids=["paper", "v4.1"])
def test_gradient_reaches_exactly_the_rows_read(config):
    """Once the value path is non-zero (after the first update), the loss moves the table rows the
    batch read and no others."""
    rng = np.random.default_rng(3)
    tokens, seg, pos = _packed(rng, [24, 16])
    ids = Hasher(config)(tokens, seg)
    params = init_params(config, seed=4)
    eng = params["layers"][1]["engram"]
    key = "wkv" if config.engram.form == "v4.1" else "value_proj"
    eng[key] = jnp.asarray(rng.normal(0, 0.2, size=eng[key].shape), jnp.float32)

    def loss(table):
        p = jax.tree.map(lambda a: a, params)
        p["layers"][1]["engram"]["table"] = table
        return jnp.mean(forward(p, tokens, config, positions=pos, segment_ids=seg, engram_ids=ids)["logits"] ** 2)

    g = np.asarray(jax.grad(loss)(eng["table"]))
    read = np.zeros(g.shape[0], bool)
    read[np.unique(ids[:, :, 0])] = True
    assert (np.abs(g[read]).sum(axis=1) > 0).mean() > 0.9  # almost every read row moves
    assert (g[~read] == 0).all()


def test_scan_layout_equals_the_loop():
    rng = np.random.default_rng(5)
    tokens, seg, pos = _packed(rng, [30, 18])
    ids = Hasher(CONFIG)(tokens, seg)
    params = init_params(CONFIG, seed=6)
    params["layers"][2]["engram"]["value_proj"] = jnp.full_like(params["layers"][2]["engram"]["value_proj"], 0.05)
    loop = forward(params, tokens, CONFIG, positions=pos, segment_ids=seg, engram_ids=ids)["logits"]
    scanned = forward(v4jax.scan.stack_layers(params, CONFIG), tokens, CONFIG, positions=pos, segment_ids=seg,
                      engram_ids=ids)["logits"]
    assert rel(scanned, loop) <= 1e-6


def test_sharded_equals_unsharded():
    """Tables row-sharded over every mesh axis (and the rest by the rules): the same logits, loss and
    gradient norm as one device (tolerances as in test_parallel: 2e-5 and 1e-4)."""
    params = init_params(CONFIG, seed=7)
    for layer in (1, 2):
        e = params["layers"][layer]["engram"]
        e["value_proj"] = jnp.full_like(e["value_proj"], 0.05)
    b = batch(CONFIG, 8, 24)
    b["engram_ids"] = Hasher(CONFIG)(b["tokens"], b["segment_ids"])
    cfg = TrainConfig(steps=10)
    opt = make_optimizer(cfg, CONFIG)
    logits = forward(params, b["tokens"], CONFIG, engram_ids=b["engram_ids"])["logits"]
    _, single = make_train_step(CONFIG, cfg, opt)(init_state(jax.tree.map(jnp.copy, params), opt), b)

    par = ParallelConfig(2, 2, 2, 1, capacity_factor=2.0)
    mesh = make_mesh(par)
    shardings = param_shardings(params, mesh, CONFIG)
    assert shardings["layers"][1]["engram"]["table"].spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)
    sharded = jax.device_put(jax.tree.map(jnp.copy, params), shardings)
    sb = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in b.items()}
    got = jax.jit(lambda p, t, i: forward(p, t, CONFIG, parallel=par, mesh=mesh, engram_ids=i)["logits"])(
        sharded, sb["tokens"], sb["engram_ids"])
    assert rel(got, logits) <= 2e-5
    state = init_state(sharded, opt)
    state = jax.device_put(state, shard_like_params(state, sharded, mesh, CONFIG))
    _, metrics = make_train_step(CONFIG, cfg, opt, par, mesh)(state, sb)
    for k in ("loss", "grad_norm"):
        assert abs(float(metrics[k]) - float(single[k])) <= 1e-4 * abs(float(single[k])), k


def test_tables_have_their_own_optimizer_group():
    """AdamW at engram_lr_multiplier times the learning rate, no weight decay; other Engram matrices
    are Muon's, its norms and biases AdamW's without decay."""
    params = init_params(CONFIG, seed=8)
    labels = optim.param_labels(params, CONFIG)["layers"][1]["engram"]
    assert labels["table"] == optim.TABLE and labels["key_proj"] == labels["value_proj"] == optim.MUON
    assert labels["q_norm"] == labels["conv"] == labels["key_bias"] == optim.ADAMW_NO_DECAY
    rng = np.random.default_rng(9)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 1e-2, x.shape), x.dtype)
                          if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros_like(x), params) for _ in range(2)]
    tx = optim.v4_optimizer(1e-3, CONFIG, table_lr_multiplier=5.0)
    alone = optax.adamw(5e-3, b1=0.9, b2=0.95, eps=1e-20, weight_decay=0.0)
    state, ref_state = tx.init(params), alone.init(params["layers"][1]["engram"]["table"])
    p, table = params, params["layers"][1]["engram"]["table"]
    for g in grads:
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)
        ref_upd, ref_state = alone.update(g["layers"][1]["engram"]["table"], ref_state, table)
        table = optax.apply_updates(table, ref_upd)
    np.testing.assert_allclose(p["layers"][1]["engram"]["table"], table, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# Data, checkpoints, conversion, config


def test_pipeline_rows_are_per_document_whatever_the_packing(tmp_path):
    """engram_ids of every batch equal each segment hashed alone: packing never changes them."""
    from v4jax.data import DataConfig, make_dataset

    docs = [" ".join(f"word{i * j % 17}" for j in range(n)) for i, n in enumerate((3, 40, 7, 25, 2, 60, 11))]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = DataConfig(path=str(tmp_path / "c.jsonl"), tokenizer="bytes", seq_len=64, batch_size=4, num_epochs=1)
    hasher = Hasher(CONFIG)
    checked = 0
    for b in make_dataset(data, 0, 1, hasher=hasher):
        assert b["engram_ids"].shape == b["tokens"].shape + (2, 6)
        for r in range(b["tokens"].shape[0]):
            for s in set(b["segment_ids"][r]) - {0}:
                cols = np.nonzero(b["segment_ids"][r] == s)[0]
                alone = hasher(b["tokens"][r:r + 1, cols], np.ones((1, len(cols)), np.int32))
                np.testing.assert_array_equal(b["engram_ids"][r, cols], alone[0])
                checked += 1
    assert checked >= len(docs)


def test_save_load_and_conversion_keep_the_engram_tensors(tmp_path):
    from v4jax.convert.__main__ import main as convert

    model = v4jax.Model.init(CONFIG, seed=10)
    model.params["layers"][1]["engram"]["value_proj"] = jnp.full_like(
        model.params["layers"][1]["engram"]["value_proj"], 0.03)
    tokens = np.random.default_rng(11).integers(3, 259, size=(2, 20))
    want = np.asarray(model.logits(tokens))
    saved = v4jax.from_pretrained(model.save(tmp_path / "orbax"), dtype="float32")
    np.testing.assert_array_equal(saved.logits(tokens), want)
    assert convert(["to-safetensors", "--src", str(tmp_path / "orbax"), "--dst", str(tmp_path / "st"),
                    "--no-progress"]) == 0
    assert convert(["to-orbax", "--src", str(tmp_path / "st"), "--dst", str(tmp_path / "back"), "--dtype",
                    "float32", "--no-progress"]) == 0
    back = v4jax.from_pretrained(tmp_path / "back", dtype="float32")
    jax.tree.map(np.testing.assert_array_equal, back.params, model.params)
    assert back.config == CONFIG


def test_config_round_trips_and_bad_values_are_refused_by_name():
    for style in (CONFIG.to_release_dict(), CONFIG.to_hf_dict(), V41.to_hf_dict()):
        assert ModelConfig.from_dict(json.loads(json.dumps(style))).engram in (CONFIG.engram, V41.engram)
    for change, field in (({"layers": [9]}, "model.engram.layers"), ({"form": "v5"}, "model.engram.form"),
                          ({"heads": 0}, "model.engram.heads"), ({"tokenizer": "gpt2"}, "model.engram.tokenizer"),
                          ({"head_size": 8}, "head_size")):
        with pytest.raises(ConfigError, match=field):
            BASE.replace(engram={**ENGRAM, **change})


def test_train_refuses_an_engram_tokenizer_other_than_the_data(tmp_path, capsys):
    from v4jax.cli.train import main

    code = main(["--config", "configs/tiny-engram.yaml", "--workdir", str(tmp_path / "w"),
                 "model.engram={layers: [1], tokenizer: deepseek}", "--no-progress"])
    assert code == 2 and "model.engram.tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_from_pretrained_of_a_model_without_engram_is_unchanged(tmp_path):
    model = v4jax.from_pretrained(write_checkpoint(tmp_path / "ck", BASE), dtype="float32")
    assert model.config.engram is None and "engram" not in model.params["layers"][1]


# --------------------------------------------------------------------------------------------------
# Needle in a haystack


def test_niah_examples_and_scoring(tmp_path):
    from v4jax.niah import NiahConfig, answer_logprobs, build_examples, evaluate_niah, save_heatmap
    from v4jax.tokenizer import load_tokenizer

    tok = load_tokenizer("bytes")
    hay = ["It was the best of times, it was the worst of times. " * 30]
    cfg = NiahConfig(lengths=(160, 320), depths=(0.0, 0.5, 1.0), samples=2, candidates=5, seed=1)
    examples = build_examples(cfg, tok, hay)
    assert len(examples) == 2 * 3 * 2
    for ex in examples:
        text = tok.decode(ex["prefix"])
        assert len(ex["prefix"]) == ex["length"]
        assert text.count("secret number of") == 3  # the needle, the question, the answer's lead-in
        true_value = tok.decode(ex["answers"][ex["truth"]]).rstrip(".")
        assert f"is {true_value}. " in text  # the needle holds the true answer
        name = text.rsplit("secret number of ", 1)[1].split(" ")[0]
        needle = f" The secret number of {name} is {true_value}. "
        question = f" What is the secret number of {name}? The secret number of {name} is "
        n_hay = len(text) - len(needle) - len(question)  # bytes: a token per character, bos decodes to ""
        assert text.endswith(question) and text.index(needle) == round(ex["depth"] * n_hay)
    vocab = tok.vocab_size

    def oracle(tokens):  # puts all probability on the next token of the true answer of every row
        out = np.full(tokens.shape + (vocab,), -50.0, np.float32)
        ex = current["ex"]
        truth = ex["answers"][ex["truth"]]
        start = len(ex["prefix"]) - 1
        for i, t in enumerate(truth):
            out[:, start + i, t] = 0.0
        return out

    current = {}
    hits = []
    for ex in examples:
        current["ex"] = ex
        hits.append(np.argmax(answer_logprobs(oracle, ex)) == ex["truth"])
    assert all(hits)

    def uniform(tokens):
        return np.zeros(tokens.shape + (vocab,), np.float32)

    result = evaluate_niah(uniform, examples, cfg)
    assert result["chance"] == 0.2 and np.asarray(result["accuracy"]).shape == (2, 3)
    png = save_heatmap(result, tmp_path / "niah.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
