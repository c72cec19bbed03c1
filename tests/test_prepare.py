"""`lmforge data prepare` and the window dataset: nanoGPT's shakespeare_char split and get_batch, documents with
BOS/EOS and offsets, input formats, errors, atomic/idempotent output, exact resume."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.assets import STORIES260K_TOKENIZER, TINYSHAKESPEARE
from lmforge.data.dataset import TokenWindows, document_offsets, load_prepared, open_prepared
from lmforge.data.prepare import prepare
from lmforge.errors import LMForgeError
from lmforge.tokenizer import Tokenizer, load_tokenizer
from lmforge.tokenizer.char import CharTokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAKESPEARE = SHARED / "data" / "corpora" / "en" / "tinyshakespeare.txt"
LLAMA2C_TOK = load_tokenizer(str(STORIES260K_TOKENIZER))


def lmforge(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def nanogpt_shakespeare_char(text: str):
    """nanoGPT's data/shakespeare_char/prepare.py, restated."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    train, val = text[: int(n * 0.9)], text[int(n * 0.9) :]
    return np.array([stoi[c] for c in train], dtype=np.uint16), np.array([stoi[c] for c in val], dtype=np.uint16)


class TinyChars(Tokenizer):
    """A 65-character vocabulary built here, independent of lmforge's char tokenizer (no BOS/EOS, no save)."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)

    def encode(self, text, bos=False, eos=False):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class Wide(Tokenizer):
    """70,000-token vocabulary: ids above 65,535 need uint32 shards."""

    vocab_size, eos_id = 70_000, 69_999

    def encode(self, text, bos=False, eos=False):
        return [65_000 + ord(c) % 4000 for c in text] + ([self.eos_id] if eos else [])


def test_shakespeare_char_reproduces_nanogpt_split(tmp_path):
    path = SHAKESPEARE if SHAKESPEARE.is_file() else TINYSHAKESPEARE  # the packaged copy is the same file
    text = path.read_text(encoding="utf-8")
    CharTokenizer.from_text(text).save(str(tmp_path / "tok"))  # what `lmforge tokenizer train --kind char` writes
    args = [path, "--tokenizer", tmp_path / "tok", "--output", tmp_path / "data", "--val-fraction", "0.1",
            "--split-mode", "tail", "--no-bos", "--no-eos"]
    r = lmforge("data", "prepare", *args)
    assert r.returncode == 0, r.stderr
    data = open_prepared(tmp_path / "data")
    train, val = data.tokens("train"), data.tokens("val")
    assert (len(train), len(val)) == (1_003_854, 111_540) and train.dtype == np.uint16
    ref_train, ref_val = nanogpt_shakespeare_char(text)
    assert np.array_equal(train, ref_train) and np.array_equal(val, ref_val)
    assert (tmp_path / "data" / "train.bin").read_bytes() == ref_train.astype("<u2").tobytes()  # raw little-endian
    assert data.tokenizer().decode(train[:200].tolist()) == text[:200]
    assert data.offsets("train").tolist() == [0] and data.offsets("val").tolist() == [0]  # one document, cut
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    assert index["sources"][0]["path"] == str(path.resolve()) and index["tokenizer_source"] == str(tmp_path / "tok")
    assert len(index["tokenizer_sha256"]) == 64 and index["splits"]["val"]["tokens"] == 111_540

    # the same run again: reported, nothing redone; different settings: refused without --overwrite
    again = lmforge("data", "prepare", *args)
    assert again.returncode == 0 and "already prepared" in again.stderr
    with pytest.raises(LMForgeError, match="already prepared from different split_mode, val_fraction"):
        prepare([str(path)], str(tmp_path / "tok"), str(tmp_path / "data"), progress=False)

    # the Python API with a Tokenizer object written here gives the same bytes
    prepare([str(path)], TinyChars(text), str(tmp_path / "api"), val_fraction=0.1, split_mode="tail", progress=False)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "api" / f).read_bytes() == (tmp_path / "data" / f).read_bytes()

    # pretraining reads the prepared directory, and gets what it computes itself from the text file
    from lmforge.stages.pretrain import load_tokens
    from lmforge.train.config import DataConfig, RunConfig

    _, p_train, p_val = load_tokens(RunConfig(data=DataConfig(path=str(tmp_path / "data"))), tmp_path / "run")
    _, t_train, t_val = load_tokens(RunConfig(data=DataConfig(path=str(path), tokenizer="char", val_fraction=0.1)),
                                    tmp_path / "run")
    assert np.array_equal(p_train, t_train) and np.array_equal(p_val, t_val)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


def split_texts(out: Path, split: str) -> list[str]:
    data = open_prepared(out)
    tok, ids, offs = data.tokenizer(), data.tokens(split), data.offsets(split)
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(offs, list(offs[1:]) + [len(ids)])]


@pytest.fixture(scope="module")
def stories():
    rng = random.Random(0)
    words = "Lily Tom ball cat sun tree ran saw big little happy the a and".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + f" {i}." for i in range(600)]


def test_jsonl_documents_bos_eos_offsets_and_workers(tmp_path, stories):
    f = write_jsonl(tmp_path / "d.jsonl", stories)
    r = lmforge("data", "prepare", f, "--tokenizer", STORIES260K_TOKENIZER, "--output", tmp_path / "o",
                "--val-fraction", "0.2", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "tokenize" in r.stderr  # summary on stdout, progress on stderr
    data = open_prepared(tmp_path / "o")
    train, val = data.tokens("train"), data.tokens("val")
    assert len(train) + len(val) == sum(len(LLAMA2C_TOK.encode(d, bos=True, eos=True)) for d in stories)
    assert data.index["splits"]["val"]["documents"] + data.index["splits"]["train"]["documents"] == len(stories)
    assert 0.2 - 0.05 < data.index["splits"]["val"]["documents"] / len(stories) < 0.2 + 0.05  # 3.1 sigma
    for split, ids in (("train", train), ("val", val)):
        offs = data.offsets(split)
        assert np.array_equal(offs, np.flatnonzero(ids == LLAMA2C_TOK.bos_id))  # BOS opens every document
        assert np.array_equal(np.flatnonzero(ids == LLAMA2C_TOK.eos_id) + 1, np.append(offs[1:], len(ids)))
    train_docs, val_docs = split_texts(tmp_path / "o", "train"), split_texts(tmp_path / "o", "val")
    assert sorted(train_docs + val_docs) == sorted(stories) and train_docs == [d for d in stories if d in train_docs]

    # the split depends on each document's text and the seed only: not on order or the number of workers
    shuffled = stories[:]
    random.Random(1).shuffle(shuffled)
    prepare([str(write_jsonl(tmp_path / "s.jsonl", shuffled))], str(STORIES260K_TOKENIZER), str(tmp_path / "s"),
            val_fraction=0.2, workers=1, progress=False)
    assert set(split_texts(tmp_path / "s", "val")) == set(val_docs)
    prepare([str(f)], str(STORIES260K_TOKENIZER), str(tmp_path / "w1"), val_fraction=0.2, workers=1, progress=False)
    for name in ("train.bin", "val.bin", "train.offsets.bin", "val.offsets.bin"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "o" / name).read_bytes()
    prepare([str(f)], str(STORIES260K_TOKENIZER), str(tmp_path / "seed"), val_fraction=0.2, seed=7, progress=False)
    assert set(split_texts(tmp_path / "seed", "val")) != set(val_docs)

    # --no-bos --no-eos: the plain concatenation of the documents' ids
    prepare([str(f)], str(STORIES260K_TOKENIZER), str(tmp_path / "plain"), val_fraction=0.0, bos=False, eos=False,
            progress=False)
    plain = open_prepared(tmp_path / "plain").tokens("train")
    assert plain.tolist() == [t for d in stories for t in LLAMA2C_TOK.encode(d)]


def test_input_formats_txt_separator_gz_json_parquet(tmp_path, stories):
    docs = stories[:30] + ["红楼梦 line\u2028separator stays inside the record 🤖"]
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(docs[:10]) + "<|endoftext|>", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as g:
        g.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[10:20])
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in docs[20:25]], ensure_ascii=False))
    write_jsonl(tmp_path / "d.jsonl", docs[25:])
    inputs = [tmp_path / "a.txt", tmp_path / "b.jsonl.gz", tmp_path / "c.json", tmp_path / "d.jsonl"]
    r = lmforge("data", "prepare", *inputs, "--tokenizer", STORIES260K_TOKENIZER, "--output", tmp_path / "o",
                "--val-fraction", "0", "--doc-separator", "<|endoftext|>")
    assert r.returncode == 0, r.stderr
    assert split_texts(tmp_path / "o", "train") == docs
    index = open_prepared(tmp_path / "o").index
    assert [s["documents"] for s in index["sources"]] == [10, 10, 5, 6]
    assert open_prepared(tmp_path / "o").tokens("val").size == 0

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs, "n": list(range(len(docs)))}), tmp_path / "e.parquet")
    prepare([str(tmp_path / "e.parquet")], str(STORIES260K_TOKENIZER), str(tmp_path / "p"), val_fraction=0.0,
            field="body", progress=False)
    assert split_texts(tmp_path / "p", "train") == docs
    with pytest.raises(LMForgeError, match=r"e\.parquet: field 'text': no such column \(columns: body, n"):
        prepare([str(tmp_path / "e.parquet")], str(STORIES260K_TOKENIZER), str(tmp_path / "q"), progress=False)


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld")
    prepare([str(tmp_path / "a.txt")], Wide(), str(tmp_path / "o"), val_fraction=0.0, progress=False)
    data = open_prepared(tmp_path / "o")
    assert data.index["dtype"] == "uint32" and data.index["eos"] is True
    expect = Wide().encode("héllo wörld", eos=True)
    assert data.tokens("train").tolist() == expect and max(expect) > 65_535
    assert np.fromfile(tmp_path / "o" / "train.bin", dtype="<u4").tolist() == expect


def test_bad_records_are_reported_with_file_and_line_or_skipped(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": oops}\n{"body": "x"}\n{"text": 3}\n[1]\n{"text": "fine"}\n')
    tok = STORIES260K_TOKENIZER
    r = lmforge("data", "prepare", f, "--tokenizer", tok, "--output", tmp_path / "o")
    last = r.stderr.strip().splitlines()[-1]  # the error is one line (after the progress bar)
    assert r.returncode == 1 and "bad.jsonl:3: malformed JSON" in last and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == [f]  # nothing half-written, no temp dir
    expected = {4: "field 'text' missing (fields: body", 5: "field 'text' is int, not a string", 6: "not a JSON object"}
    lines = f.read_text().splitlines()
    for n, what in expected.items():
        g = tmp_path / "checks" / f"only{n}.jsonl"
        g.parent.mkdir(exist_ok=True)
        g.write_text(lines[0] + "\n" + lines[n - 1] + "\n")
        with pytest.raises(LMForgeError, match=f"only{n}.jsonl:2: {re.escape(what)}"):
            prepare([str(g)], str(tok), str(tmp_path / "o"), progress=False)
    r = lmforge("data", "prepare", f, "--tokenizer", tok, "--output", tmp_path / "o", "--skip-bad",
                "--val-fraction", "0")
    assert r.returncode == 0 and "skipped 4 bad record(s) (first: " in r.stderr and "bad.jsonl:3" in r.stderr
    assert split_texts(tmp_path / "o", "train") == ["ok", "fine"]
    assert open_prepared(tmp_path / "o").index["skipped_bad_records"] == 4
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(LMForgeError, match=r"latin1.txt:1: not UTF-8 text \(byte 3 of the line is 0xe9"):
        prepare([str(tmp_path / "latin1.txt")], str(tok), str(tmp_path / "l"), progress=False)


BAD_LINES = [b'{"text": oops}', b'{"body": "x", "id": 3}', b'{"text": 3}', b'[1]',
             '{"text": "caf\u00e9"}'.encode("latin-1")]


@pytest.mark.parametrize("line", BAD_LINES)
def test_prepare_and_clean_report_a_bad_record_alike(tmp_path, line):
    """One reader (lmforge.data.io): the same one-line error, and --skip-bad counts the same records."""
    from lmforge.data.clean.pipeline import clean

    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"text": "Lily saw a cat."}\n' + line + b'\n{"text": "Tom ran."}\n')
    errors = []
    for run in (lambda: prepare([str(f)], str(STORIES260K_TOKENIZER), str(tmp_path / "o"), progress=False),
                lambda: clean([str(f)], tmp_path / "c.jsonl", config={"stages": ["pii"]}, progress=False)):
        with pytest.raises(LMForgeError) as e:
            run()
        errors.append(str(e.value))
    assert errors[0] == errors[1] and errors[0].startswith(f"{f}:2: ") and "\n" not in errors[0]
    index = prepare([str(f)], str(STORIES260K_TOKENIZER), str(tmp_path / "o"), val_fraction=0.0, skip_bad=True,
                    progress=False)
    rep = clean([str(f)], tmp_path / "c.jsonl", config={"stages": ["pii"]}, skip_bad=True, progress=False)
    assert index["skipped_bad_records"] == rep["bad_records"]["skipped"] == 1
    assert split_texts(tmp_path / "o", "train") == ["Lily saw a cat.", "Tom ran."]


def test_text_is_kept_exactly_and_empty_documents_are_dropped(tmp_path, monkeypatch):
    import lmforge.data.io as lio

    monkeypatch.setattr(lio, "CHUNK", 7)  # separators and UTF-8 characters straddle the blocks read
    (tmp_path / "a.txt").write_bytes("\ufeffOne day\r\nLily saw 红楼梦\r\n\r\n  \r\n\r\nTom ran\r\n\r\n".encode())
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "Lily"}\n{"text": "  "}\n{"text": "Tom"}\n')
    (tmp_path / "c.txt").write_text(" \n")
    inputs = [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.txt")]
    index = prepare(inputs, TinyChars("".join(chr(c) for c in range(32, 128)) + "\r\n红楼梦"), str(tmp_path / "o"),
                    val_fraction=0.0, separator="\r\n\r\n", progress=False)
    assert [s["documents"] for s in index["sources"]] == [2, 2, 0] and index["skipped_bad_records"] == 0
    ids = open_prepared(tmp_path / "o").tokens("train")
    tok = TinyChars("".join(chr(c) for c in range(32, 128)) + "\r\n红楼梦")
    assert tok.decode(ids.tolist()) == "One day\r\nLily saw 红楼梦" + "Tom ran" + "Lily" + "Tom"


def test_output_is_replaced_atomically_and_never_clobbered(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Once upon a time there was a cat. " * 50)
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LMForgeError, match=r"not a prepared dataset \(no index.json\); refusing"):
        prepare([str(f)], str(STORIES260K_TOKENIZER), str(out), overwrite=True, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    out = tmp_path / "p"
    first = prepare([str(f)], str(STORIES260K_TOKENIZER), str(out), val_fraction=0.0, progress=False)
    f.write_text("A different story. " * 10)  # the source changed size: a rerun must not silently reuse the output
    with pytest.raises(LMForgeError, match="already prepared from different sources"):
        prepare([str(f)], str(STORIES260K_TOKENIZER), str(out), val_fraction=0.0, progress=False)
    second = prepare([str(f)], str(STORIES260K_TOKENIZER), str(out), val_fraction=0.0, overwrite=True,
                     progress=False)
    assert second["splits"]["train"]["tokens"] < first["splits"]["train"]["tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "o", "p"]  # no temp or set-aside directory


def test_corrupt_shard_and_changed_tokenizer_are_detected(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Once upon a time there was a cat. " * 50)
    prepare([str(f)], str(STORIES260K_TOKENIZER), str(tmp_path / "o"), val_fraction=0.0, workers=1, progress=False)
    tok, train, val = load_prepared(tmp_path / "o")
    assert isinstance(train, np.memmap) and val.size == 0 and tok.vocab_size == 512
    assert document_offsets(tmp_path / "o", "train").tolist() == [0]
    data = (tmp_path / "o" / "train.bin").read_bytes()
    (tmp_path / "o" / "train.bin").write_bytes(data[:-2])
    with pytest.raises(LMForgeError, match="truncated or corrupt"):
        load_prepared(tmp_path / "o")
    (tmp_path / "o" / "train.bin").write_bytes(data)
    tok_file = tmp_path / "o" / "tokenizer" / "tokenizer.bin"
    tok_file.write_bytes(tok_file.read_bytes()[:-1] + b"x")
    with pytest.raises(LMForgeError, match="hash mismatch"):
        load_prepared(tmp_path / "o")


# ---- the window dataset ------------------------------------------------------------------------------------------

TOKENS = np.random.default_rng(0).integers(0, 500, 10_000).astype(np.uint16)


def nanogpt_get_batch(data: np.ndarray, block_size: int, batch_size: int):
    """nanoGPT train.py's get_batch (CPU), restated."""
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i : i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1 : i + 1 + block_size]).astype(np.int64)) for i in ix])
    return x, y


def test_random_windows_equal_nanogpt_get_batch():
    torch.manual_seed(1337)
    ref = [nanogpt_get_batch(TOKENS, 64, 12) for _ in range(5)]
    ds = TokenWindows(TOKENS, 64, 12, seed=1337)
    for x, y in ref:
        b = ds.next_batch()
        assert b["input_ids"].dtype == torch.int64 and torch.equal(b["input_ids"], x) and torch.equal(b["targets"], y)
    # data parallel: rank r of `world` takes its slice of the same draw (world 1 with batch 2B is both ranks)
    both = TokenWindows(TOKENS, 16, 8, seed=3).next_batch()["input_ids"]
    r0, r1 = (TokenWindows(TOKENS, 16, 4, seed=3, rank=r, world=2).next_batch()["input_ids"] for r in (0, 1))
    assert torch.equal(torch.cat([r0, r1]), both)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_exactly_from_state_dict(mode):
    ds = TokenWindows(TOKENS, 32, 4, mode=mode, seed=5)
    ref = [ds.next_batch() for _ in range(9)]
    again = TokenWindows(TOKENS, 32, 4, mode=mode, seed=5)
    for _ in range(4):
        again.next_batch()
    state = json.loads(json.dumps(again.state_dict()))  # a trainer stores it as JSON
    fresh = TokenWindows(TOKENS, 32, 4, mode=mode, seed=999)
    fresh.load_state_dict(state)
    for b in ref[4:]:
        assert torch.equal(fresh.next_batch()["input_ids"], b["input_ids"])
    assert all(torch.equal(a["targets"], b["targets"]) for a, b in zip(ds.fixed_batches(3, 5), ref))
    with pytest.raises(LMForgeError, match="block_size=32, this run.s has 16"):
        TokenWindows(TOKENS, 16, 4, mode=mode).load_state_dict(state)


def test_sequential_windows_cover_the_split_in_order():
    T, B = 100, 7
    ds = TokenWindows(TOKENS, T, B, mode="sequential")
    assert ds.num_windows == (len(TOKENS) - 1) // T == 99
    xs = torch.cat([ds.next_batch()["input_ids"] for _ in range(15)])  # 105 windows: one epoch and 6 more
    flat = TOKENS[: 99 * T].astype(np.int64)
    assert torch.equal(xs[:99].reshape(-1), torch.from_numpy(flat)) and torch.equal(xs[99:], xs[:6])
    b = TokenWindows(TOKENS, T, 2, mode="sequential").next_batch()
    assert torch.equal(b["targets"][0], torch.from_numpy(TOKENS[1 : T + 1].astype(np.int64)))


def test_document_boundaries_in_batches(tmp_path, stories):
    prepare([str(write_jsonl(tmp_path / "d.jsonl", stories))], str(STORIES260K_TOKENIZER), str(tmp_path / "o"),
            val_fraction=0.0, progress=False)
    data = open_prepared(tmp_path / "o")
    ids = data.tokens("train")
    ds = data.windows("train", 48, 6, seed=2, documents=True)
    for _ in range(4):
        b = ds.next_batch()
        x = b["input_ids"]
        for row in range(x.shape[0]):
            seg, pos, t = b["segment_ids"][row].tolist(), b["doc_positions"][row].tolist(), x[row].tolist()
            # brute force from the tokens themselves: BOS opens a document
            expect_seg = [sum(tok == LLAMA2C_TOK.bos_id for tok in t[1 : k + 1]) for k in range(len(t))]
            assert seg == expect_seg
            bos = [k for k, tok in enumerate(t) if tok == LLAMA2C_TOK.bos_id]
            assert [k for k, p in enumerate(pos) if p == 0] == bos
            assert all(p2 == p1 + 1 for p1, p2, s1, s2 in zip(pos, pos[1:], seg, seg[1:]) if s1 == s2)
            nxt = b["targets"][row].tolist()
            assert b["loss_mask"][row].tolist() == [int(tok != LLAMA2C_TOK.bos_id) for tok in nxt]
    assert len(ids) == data.num_tokens("train")
