"""Input pipeline: documents -> tokens -> packed rows, on grain's dataset API.

Usage::

    cfg = DataConfig(seq_len=512, batch_size=16, seed=0)           # bundled Shakespeare, train split
    it = make_dataset(cfg)                                          # this host's share of each batch
    batch = next(it)                                                # dict of numpy arrays
    state = it.get_state()                                          # JSON-serialisable; store it
    it = make_dataset(cfg); it.set_state(state)                     # same next batches as before
    eval_it = make_dataset(cfg.for_eval())                          # held-out split, one pass
    mine = DataConfig(path="my/*.jsonl", heldout_fraction=0.05)     # your files; about 5% of documents held out

Batch fields, each of shape [rows, seq_len] with rows = ``batch_size // process_count`` (the batch
size in the config is global; each host yields its own rows):

=============== ======= ===============================================================================
field           dtype   meaning
=============== ======= ===============================================================================
``tokens``      int32   token ids; padding holds the tokenizer's ``pad_id``
``positions``   int32   position inside the segment, restarting at 0 at each segment start; 0 on padding
``segment_ids`` int32   1, 2, ... for the segments of a row in order; 0 marks padding
``targets``     int32   ``tokens[t + 1]`` when it is in the same segment, else ``pad_id``
``loss_mask``   float32 1.0 where ``targets`` is real, else 0.0 (segment ends and padding)
``mtp_targets`` int32   ``tokens[t + 2]`` when it is in the same segment, else ``pad_id`` (the depth-1
                        MTP head at position t predicts token t + 2)
``mtp_mask``    float32 1.0 where ``mtp_targets`` is real, else 0.0
``engram_ids``  int32   with an Engram ``hasher`` only: [rows, seq_len, Engram layers, slots], the table
                        rows each token reads (``v4jax.engram.Hasher``; n-grams stay in their segment)
=============== ======= ===============================================================================

The masks are float so that a loss reads ``sum(ce * mask) / max(sum(mask), 1)``. ``positions`` and
``segment_ids`` go straight to ``v4jax.model.forward``.

How rows are made
-----------------
1. *Documents.* The bundled corpus (``path=None``): 42 public-domain Shakespeare works under
   ``data/shakespeare/{train,heldout}/``, one document per file (see ``data/README.md``). Local files
   (``path``: a file, a directory searched recursively, or a glob):

   * ``.txt``: the whole file is one document (UTF-8). Splitting on blank lines would cut a play
     into single speeches; for many short documents write ``.jsonl`` instead.
   * ``.jsonl``: one JSON object per line, the text in ``text_field`` (default ``"text"``).
   * ``.parquet``: the column ``text_field``, read with pyarrow.

   * ``format: chat`` (SFT): ``.jsonl`` conversations, ``{"messages": [...]}`` per line
     (``v4jax.sft``); each is a document whose tokens are its chat rendering, and ``loss_mask`` and
     ``mtp_mask`` count only the targets an assistant turn writes (docs/data.md).

   Files are taken in sorted path order, records in file order; empty documents are skipped. A
   local corpus is one split when ``heldout_fraction`` is 0 or None (not set). With a fraction > 0
   a document goes to ``heldout`` when the SHA-256 of its text, read as a number in [0, 1), is
   below the fraction (stable when files are added or reordered; duplicates land on the same side),
   and to ``train`` otherwise. ``resolve_heldout_fraction`` picks the fraction train.py uses when
   none is set (about 5% of the documents, see there); ``docs/data.md`` shows it all by example.
2. *Host sharding.* Host ``i`` of ``n`` keeps documents ``i, i + n, i + 2n, ...``: the hosts see
   disjoint sets of documents whose union is the split. A host with no document is an error.
3. *Tokens.* Each document becomes ``[bos] + encode(text) + [eos]`` (``add_bos``, on by default:
   the first word then has a target and every document starts from the same token, as DeepSeek's
   own prompts do). The special-flagged strings inside the text (BOS, EOS, pad) are encoded as
   plain text, never as control tokens; the chat markers (``<｜User｜>``, ``<｜Assistant｜>``,
   ``<think>``, ``</think>``), which the tokenizer does not flag special, become their ids. The host's documents are tokenized once, up front (the ``deepseek`` tokenizer
   runs in Rust over all cores); the token arrays are held in memory, so this pipeline is meant for
   corpora of up to a few GB of text per host.
4. *Pieces.* Documents longer than ``seq_len`` are cut into pieces of ``seq_len`` tokens with a
   stride of ``seq_len - 1``: consecutive pieces share one token, so every next-token pair of a
   document is a training target exactly once per epoch. Each piece is its own segment (positions
   restart at 0); the pieces are the unit of shuffling, so a batch mixes many documents.
5. *Shuffle and epochs.* ``grain.MapDataset.shuffle(seed)`` over the pieces, ``repeat(num_epochs)``
   (``None``: forever, a new order in every epoch). Same seed, same order; another seed, another.
6. *Packing.* ``grain.experimental.FirstFitPackIterDataset`` places pieces whole into rows (no
   piece is split again) with ``packing_bins`` open rows; full-length pieces fill a row alone,
   document tails share rows. Rows are then batched; the last batch of a finite pass is filled up
   with padding rows so every batch has the same shape.

Iterator state: ``get_state()`` returns a small dict of ints and strings (grain's state plus the
settings it depends on); ``set_state`` refuses a state saved under other settings or another host
layout. No worker processes: after the up-front tokenization a batch costs a few array copies, and
jax's asynchronous dispatch already overlaps it with the device step (grain's multiprocessing
also needs absl flags to be parsed first).

Tokenizers (``tokenizer`` field): ``deepseek`` (DeepSeek-V4's, 129280 ids) and ``bytes`` (259 ids, for
tiny models), both with bos 0, eos 1, pad 2; see ``v4jax.tokenizer``.

``unigram_entropy`` gives the entropy (nats per token) of the unigram distribution of the tokens a
split trains on (every document token after the first, eos included): the cross-entropy of a model
that ignores context, a reference level for the training loss.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from v4jax.chat import MODES
from v4jax.config import ConfigError
from v4jax.jsonl import json_lines
from v4jax.sft import encode_conversation, read_conversations
from v4jax.tokenizer import TOKENIZERS, load_tokenizer

FORMATS = ("text", "chat")
SPLITS = ("train", "heldout")
SUFFIXES = (".txt", ".jsonl", ".parquet")
HELDOUT_SHARE = 0.05  # of a local corpus's documents, held out when heldout_fraction is not set
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "shakespeare"
STATE_FORMAT = 1
# settings added since STATE_FORMAT 1, with the value a state saved before them implies
SETTINGS_ADDED = {"format": "text", "chat_mode": "chat"}
BATCH_FIELDS = ("tokens", "positions", "segment_ids", "targets", "loss_mask", "mtp_targets", "mtp_mask")


class DataError(ValueError):
    """A corpus file cannot be used as asked (missing field, bad encoding, no documents...)."""


# --------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it. ``batch_size`` is global (summed over hosts)."""

    path: str | None = None  # None: the bundled Shakespeare corpus
    split: str = "train"  # "train" | "heldout"
    tokenizer: str = "deepseek"  # "deepseek" | "bytes"
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    text_field: str = "text"  # .jsonl field / .parquet column holding the text
    # local corpora only: the share of documents in "heldout" (see the module docstring); None: not
    # set, the whole corpus is "train" (train.py sets one: resolve_heldout_fraction)
    heldout_fraction: float | None = None
    add_bos: bool = True
    packing_bins: int = 64  # open rows of the first-fit packer
    # "chat": .jsonl conversations for SFT ({"messages": [...]}, v4jax.sft), the loss on the tokens
    # the assistant turns write; chat_mode: their reasoning mode where a line sets none
    format: str = "text"
    chat_mode: str = "chat"

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ConfigError(f"data.split={self.split!r}: allowed values are {', '.join(SPLITS)}")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"data.tokenizer={self.tokenizer!r}: allowed values are {', '.join(TOKENIZERS)}")
        if self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r}: allowed values are {', '.join(FORMATS)}")
        if self.format == "chat":
            if self.chat_mode not in MODES:
                raise ConfigError(f"data.chat_mode={self.chat_mode!r}: allowed values are {', '.join(MODES)}")
            if self.path is None or self.tokenizer != "deepseek":
                raise ConfigError("data.format='chat' reads conversations from data.path (.jsonl files, one "
                                  "{'messages': [...]} per line) with tokenizer='deepseek' (the chat markers' ids)")
        for name, low in (("seq_len", 2), ("batch_size", 1), ("packing_bins", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"data.{name}={value!r}: must be an integer >= {low}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs < 1):
            raise ConfigError(f"data.num_epochs={self.num_epochs!r}: must be an integer >= 1, or None for no end")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed={self.seed!r}: must be an integer in [0, 2**32)")
        fraction = self.heldout_fraction
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0.0 <= fraction < 1.0):
            raise ConfigError(f"data.heldout_fraction={fraction!r}: must be a number in [0, 1), or null to let "
                              "train.py choose")
        if self.path is None and self.heldout_fraction:
            raise ConfigError("data.heldout_fraction applies to local corpora (data.path); the bundled corpus "
                              "has a fixed held-out split: leave data.heldout_fraction unset")
        if self.path is not None and self.split == "heldout" and not self.heldout_fraction:
            raise ConfigError(f"data.split='heldout' with data.path={self.path!r} needs data.heldout_fraction > 0 "
                              "(or point data.path at a separate held-out corpus and use split='train')")

    def for_eval(self) -> DataConfig:
        """The held-out split, in file order, one pass."""
        return dataclasses.replace(self, split="heldout", shuffle=False, num_epochs=1)


# --------------------------------------------------------------------------------------------------
# Documents


_NO_FILES_FIX = ("set data.path to a .txt/.jsonl/.parquet file, a directory holding such files, or a glob "
                 "pattern (e.g. 'corpus/*.jsonl'); leave it empty for the bundled Shakespeare corpus")


def find_files(path: str | Path) -> list[Path]:
    """The corpus files named by ``path`` (file, directory searched recursively, or glob), sorted."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix!r}; {_NO_FILES_FIX}")
        return [p]
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES]
        where = f"directory {p} (searched recursively)"
    elif glob.has_magic(str(p)):
        files = [Path(f) for f in glob.glob(str(p), recursive=True)]
        files = [f for f in files if f.is_file() and f.suffix in SUFFIXES]
        where = f"glob {str(path)!r}"
    else:
        raise FileNotFoundError(f"data path {str(path)!r} does not exist; {_NO_FILES_FIX}")
    if not files:
        raise FileNotFoundError(f"no .txt, .jsonl or .parquet files in {where}; {_NO_FILES_FIX}")
    return sorted(files)


def _read_txt(f: Path) -> list[str]:
    try:
        return [f.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _read_jsonl(f: Path, field: str) -> list[str]:
    texts = []
    for where, obj in json_lines(f, DataError):
        if not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{where}: no {field!r} field (found {keys}); set data.text_field to the field "
                            "that holds the text")
        if not isinstance(obj[field], str):
            raise DataError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not a string")
        texts.append(obj[field])
    return texts


def _read_parquet(f: Path, field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(f)
    if field not in schema.names:
        raise DataError(f"{f}: no {field!r} column (columns: {schema.names}); set data.text_field to the column "
                        "that holds the text")
    col_type = schema.field(field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise DataError(f"{f}: column {field!r} has type {col_type}, not string")
    return [t for t in pq.read_table(f, columns=[field]).column(field).to_pylist() if t is not None]


def _read_conversations(f: Path, mode: str) -> list[str]:
    """A .jsonl file's conversations (``v4jax.sft.read_conversations``), each as its canonical JSON
    text: a document like any other for the held-out split and the host sharding."""
    if f.suffix != ".jsonl":
        raise DataError(f"{f}: data.format='chat' reads .jsonl files (one {{'messages': [...]}} per line)")
    try:
        return [json.dumps(c, sort_keys=True, ensure_ascii=False) for c in read_conversations(f, mode)]
    except ValueError as e:
        raise DataError(str(e)) from None


def hash_value(text: str) -> float:
    """The SHA-256 of a document's text read as a number in [0, 1): its place in the held-out split."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def load_documents(cfg: DataConfig) -> list[str]:
    """All documents of ``cfg.split`` (every host's), in a fixed order."""
    if cfg.path is None:
        root = BUNDLED_DIR / cfg.split
        if not root.is_dir():
            raise FileNotFoundError(f"bundled corpus not found at {root}: it ships with the v4jax git repository, "
                                    "not with the wheel; run from a clone (pip install -e .) or set data.path")
        return [t for f in sorted(root.glob("*.txt")) for t in _read_txt(f) if t.strip()]
    docs = []
    for f in find_files(cfg.path):
        if cfg.format == "chat":
            docs += _read_conversations(f, cfg.chat_mode)
        elif f.suffix == ".txt":
            docs += _read_txt(f)
        elif f.suffix == ".jsonl":
            docs += _read_jsonl(f, cfg.text_field)
        else:
            docs += _read_parquet(f, cfg.text_field)
    docs = [d for d in docs if d.strip()]
    if cfg.heldout_fraction:
        docs = [d for d in docs if (hash_value(d) < cfg.heldout_fraction) == (cfg.split == "heldout")]
    if not docs:
        raise DataError(f"no non-empty documents in split {cfg.split!r} of {cfg.path!r}")
    return docs


def resolve_heldout_fraction(cfg: DataConfig, saved: float | None = None) -> DataConfig:
    """``cfg`` with ``heldout_fraction`` decided, as train.py starts or resumes a run.

    A fraction the config sets is kept. When it is None (not set): the ``saved`` fraction of the run
    being resumed, so that a run never changes its split; 0 for the bundled corpus, which has its
    own held-out plays; and for a local corpus the smallest fraction that holds out
    ``HELDOUT_SHARE`` of its distinct documents, at least one and never all, stated in a warning
    (a corpus of one document, e.g. a single .txt file, gets none, with a warning too).

    Why a split by default, and whether or not the run evaluates as it trains: someone who points
    ``data.path`` at their corpus expects the held-out loss (``train.eval_every``, ``eval.py``) to
    work, as it does on the bundled corpus, not to find out at the first evaluation that it needs a
    setting. The split is a property of the data, so ``eval.py`` can evaluate the run later, and a
    resumed run that turns evaluation on trains on the same documents. The fraction comes from the
    documents' hashes rather than a fixed 5% so that a corpus of a few documents still gets one on
    each side; train.py records it with the run (``config.json``, each checkpoint), and documents
    added later fall on either side of the same threshold.
    """
    if cfg.heldout_fraction is not None:
        return cfg
    if saved is not None:
        return dataclasses.replace(cfg, heldout_fraction=saved)
    if cfg.path is None:
        return dataclasses.replace(cfg, heldout_fraction=0.0)
    docs = load_documents(dataclasses.replace(cfg, split="train"))
    values = sorted({hash_value(d) for d in docs})
    if len(values) < 2:
        warnings.warn(f"data.path={cfg.path!r} holds a single document (a .txt file is one document), so none is "
                      "held out for evaluation: split the text into several files, or a .jsonl with one document "
                      "per line, for a held-out split", stacklevel=2)
        return dataclasses.replace(cfg, heldout_fraction=0.0)
    held = min(len(values) - 1, max(1, round(HELDOUT_SHARE * len(values))))
    fraction = math.nextafter(values[held - 1], 1.0)  # the held-out documents hash below it
    out = [d for d in docs if hash_value(d) < fraction]
    warnings.warn(f"data.heldout_fraction is not set: {len(out)} of the {len(docs)} documents of {cfg.path} "
                  f"({sum(map(len, out)) / sum(map(len, docs)):.1%} of the text) are held out for evaluation "
                  f"(data.heldout_fraction={fraction!r}, kept with the run); set data.heldout_fraction=0 to train "
                  "on all of them", stacklevel=2)
    return dataclasses.replace(cfg, heldout_fraction=fraction)


# --------------------------------------------------------------------------------------------------
# Tokenized corpus and pieces


@functools.lru_cache(maxsize=8)
def _encoded(path, split, text_field, heldout_fraction, tokenizer, add_bos, fmt, chat_mode, process_index,
             process_count, stamp):
    """Token ids of this host's documents, concatenated: (ids [T] int32, doc_starts [D + 1] int64,
    trained [T] bool or None). ``trained`` (chat format): the tokens the assistant turns write
    (``v4jax.sft.encode_conversation``); a conversation's tokens carry their own BOS and EOS.

    ``stamp`` (the files' names, sizes and modification times) only keys the cache, so that an
    edited corpus is read again.
    """
    cfg = DataConfig(path=path, split=split, text_field=text_field, heldout_fraction=heldout_fraction,
                     tokenizer=tokenizer, add_bos=add_bos, format=fmt, chat_mode=chat_mode)
    docs = load_documents(cfg)[process_index::process_count]
    if not docs:
        raise DataError(f"host {process_index} of {process_count} gets no document: split {split!r} of "
                        f"{path or 'the bundled corpus'} has fewer documents than hosts")
    tok = load_tokenizer(tokenizer)
    trained = None
    if fmt == "chat":
        pairs = [encode_conversation(c["messages"], tok, c["mode"]) for c in map(json.loads, docs)]
        encoded = [np.asarray(t, np.int32) for t, _ in pairs]
        trained = np.concatenate([np.asarray(f, bool) for _, f in pairs])
        trained.flags.writeable = False
    else:
        head = [tok.bos_id] if add_bos else []
        encoded = [np.concatenate([np.asarray(head, np.int32), e, np.asarray([tok.eos_id], np.int32)])
                   for e in tok.encode_batch(docs)]
    starts = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=starts[1:])
    ids = np.concatenate(encoded)
    ids.flags.writeable = False
    starts.flags.writeable = False
    return ids, starts, trained


def _cfg_encoded(cfg: DataConfig, process_index: int, process_count: int):
    files = sorted((BUNDLED_DIR / cfg.split).glob("*.txt")) if cfg.path is None else find_files(cfg.path)
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _encoded(cfg.path, cfg.split, cfg.text_field, cfg.heldout_fraction, cfg.tokenizer, cfg.add_bos,
                    cfg.format, cfg.chat_mode, process_index, process_count, stamp)


def piece_table(doc_starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every piece: documents cut into ``seq_len`` tokens with stride ``seq_len - 1``."""
    stride = seq_len - 1
    doc_starts = np.asarray(doc_starts, np.int64)
    lens = np.diff(doc_starts)
    n = np.maximum(1, -(-(lens - 1) // stride))  # pieces needed to cover each document's lens - 1 pairs
    doc = np.repeat(np.arange(len(lens)), n)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n) - n, n)  # piece number inside its document
    starts = doc_starts[doc] + stride * k
    return starts, np.minimum(seq_len, doc_starts[doc + 1] - starts)


class _Pieces(Sequence):
    """Random access to pieces: item i is ``{"tokens": int32 [length_i]}`` (and ``trained`` int32
    [length_i] where the corpus flags the tokens the loss counts)."""

    def __init__(self, ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, trained: np.ndarray | None):
        self._ids, self._starts, self._lengths, self._trained = ids, starts, lengths, trained

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s, n = int(self._starts[i]), int(self._lengths[i])
        piece = {"tokens": np.array(self._ids[s:s + n])}
        if self._trained is not None:
            piece["trained"] = self._trained[s:s + n].astype(np.int32)
        return piece


# --------------------------------------------------------------------------------------------------
# Rows and batches


def _shift(tokens, seg, k, pad_id):
    """Token k steps ahead within the same segment, and the mask of where there is one."""
    target = np.full_like(tokens, pad_id)
    mask = np.zeros(tokens.shape, np.float32)
    same = (seg[:, k:] == seg[:, :-k]) & (seg[:, :-k] != 0)
    target[:, :-k] = np.where(same, tokens[:, k:], pad_id)
    mask[:, :-k] = same
    return target, mask


def finish_batch(batch: dict[str, np.ndarray], *, rows: int, pad_id: int, hasher=None) -> dict[str, np.ndarray]:
    """Packed rows (``tokens``, ``tokens_segment_ids``, ``tokens_positions``, optional ``trained``)
    -> the training batch: targets and masks of the next and the one after (MTP), padded to
    ``rows``, with Engram's rows when ``hasher`` is given."""
    tokens = batch["tokens"].astype(np.int32)
    seg = batch["tokens_segment_ids"].astype(np.int32)
    pos = batch["tokens_positions"].astype(np.int32)
    trained = batch.get("trained")
    if tokens.shape[0] < rows:  # the last batch of a finite pass
        extra = ((0, rows - tokens.shape[0]), (0, 0))
        tokens = np.pad(tokens, extra, constant_values=pad_id)
        seg, pos = np.pad(seg, extra), np.pad(pos, extra)
        trained = None if trained is None else np.pad(trained, extra)
    targets, loss_mask = _shift(tokens, seg, 1, pad_id)
    mtp_targets, mtp_mask = _shift(tokens, seg, 2, pad_id)
    if trained is not None:  # chat format: only the targets an assistant turn writes count
        loss_mask[:, :-1] *= trained[:, 1:]
        mtp_mask[:, :-2] *= trained[:, 2:]
    out = {"tokens": tokens, "positions": pos, "segment_ids": seg, "targets": targets, "loss_mask": loss_mask,
           "mtp_targets": mtp_targets, "mtp_mask": mtp_mask}
    if hasher is not None:  # Engram's rows, computed here on the host, never on the device
        out["engram_ids"] = hasher(tokens, seg)
    return out


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


def _local_rows(cfg: DataConfig, process_count: int) -> int:
    if cfg.batch_size % process_count:
        raise ConfigError(f"data.batch_size={cfg.batch_size} (global) is not divisible by the {process_count} "
                          "hosts; each host yields batch_size // process_count rows")
    return cfg.batch_size // process_count


def build_dataset(cfg: DataConfig, process_index: int | None = None, process_count: int | None = None,
                  hasher=None):
    """The grain ``IterDataset`` of this host's batches (see the module docstring); ``hasher`` (a
    ``v4jax.engram.Hasher``) adds ``engram_ids``."""
    import grain

    pi, pc = _host(process_index, process_count)
    rows = _local_rows(cfg, pc)
    ids, doc_starts, trained = _cfg_encoded(cfg, pi, pc)
    tok = load_tokenizer(cfg.tokenizer)
    ds = grain.MapDataset.source(_Pieces(ids, *piece_table(doc_starts, cfg.seq_len), trained))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    # Pieces are array slices: reading them in threads ahead of time would cost more than it saves.
    pieces = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    padding = {"tokens": tok.pad_id} if trained is None else {"tokens": tok.pad_id, "trained": 0}
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct={f: cfg.seq_len for f in padding}, num_packing_bins=cfg.packing_bins, seed=cfg.seed,
        shuffle_bins=cfg.shuffle, padding_struct=padding)
    finish = functools.partial(finish_batch, rows=rows, pad_id=tok.pad_id, hasher=hasher)
    return packed.batch(rows, drop_remainder=False).map(finish)


class DataIterator(Iterator[dict[str, np.ndarray]]):
    """This host's batches, with ``get_state``/``set_state`` for checkpoints."""

    def __init__(self, cfg: DataConfig, process_index: int | None = None, process_count: int | None = None,
                 hasher=None):
        self.config = cfg
        self.process_index, self.process_count = _host(process_index, process_count)
        self.rows = _local_rows(cfg, self.process_count)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        ids, doc_starts, _ = _cfg_encoded(cfg, self.process_index, self.process_count)
        self.num_documents, self.num_tokens = len(doc_starts) - 1, len(ids)
        self._it = iter(build_dataset(cfg, self.process_index, self.process_count, hasher))

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def _settings(self) -> dict[str, Any]:
        s = dataclasses.asdict(self.config)
        s.update(process_index=self.process_index, process_count=self.process_count)
        return s

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``set_state`` of it on a fresh iterator resumes exactly here."""
        return {"format": STATE_FORMAT, "settings": self._settings(), "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "grain" not in state:
            raise ValueError(f"not a v4jax data iterator state (format {STATE_FORMAT}): {state!r:.200}")
        mine, saved = self._settings(), {**SETTINGS_ADDED, **state.get("settings", {})}
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError("data iterator state was saved under other settings (field: saved, now): "
                             + ", ".join(f"{k}: {a!r}, {b!r}" for k, (a, b) in diff.items()))
        self._it.set_state(state["grain"])


def make_dataset(cfg: DataConfig, process_index: int | None = None, process_count: int | None = None,
                 hasher=None) -> DataIterator:
    """Iterator over this host's batches: dicts of [batch_size // process_count, seq_len] numpy arrays.

    process_index/process_count default to ``jax.process_index()``/``jax.process_count()``;
    ``hasher`` (a ``v4jax.engram.Hasher``, for a model with Engram) adds ``engram_ids``.
    """
    return DataIterator(cfg, process_index, process_count, hasher)


# --------------------------------------------------------------------------------------------------
# Reference level for the loss


def unigram_entropy(data: DataConfig | np.ndarray | Sequence[int]) -> float:
    """Entropy in nats of the unigram distribution of a split's target tokens (or of the ids given).

    For a ``DataConfig`` the tokens are those the loss sees: each document's tokens after its first
    (so eos counts and a leading bos does not), over all hosts' documents.
    """
    if isinstance(data, DataConfig):
        ids, doc_starts, trained = _cfg_encoded(data, 0, 1)
        keep = np.ones(len(ids), bool)
        keep[doc_starts[:-1]] = False
        if trained is not None:  # chat format: the tokens the loss sees
            keep &= trained
        ids = ids[keep]
    else:
        ids = np.asarray(data, np.int64).ravel()
    if ids.size == 0:
        raise ValueError("unigram_entropy of no tokens")
    counts = np.bincount(ids)
    p = counts[counts > 0] / ids.size
    return float(-(p * np.log(p)).sum())
