"""`lmforge data prepare`: nanoGPT's shakespeare_char split, JSONL documents with EOS, errors, and pretraining
from the prepared shards."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lmforge.assets import STORIES260K_TOKENIZER, TINYSHAKESPEARE
from lmforge.data.dataset import document_offsets, load_prepared
from lmforge.errors import LMForgeError
from lmforge.tokenizer import load_tokenizer


def lmforge(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300)


def test_shakespeare_char_reproduces_nanogpt_split(tmp_path):
    assert lmforge("tokenizer", "train", "--input", str(TINYSHAKESPEARE), "--vocab-size", "0", "--kind", "char",
                   "--output", str(tmp_path / "tok")).returncode == 0
    r = lmforge("data", "prepare", str(TINYSHAKESPEARE), "--tokenizer", str(tmp_path / "tok"), "--output",
                str(tmp_path / "data"), "--val-fraction", "0.1", "--split-mode", "tail")
    assert r.returncode == 0, r.stderr
    tok, train, val = load_prepared(tmp_path / "data")
    assert (len(train), len(val)) == (1_003_854, 111_540) and train.dtype == np.uint16
    text = TINYSHAKESPEARE.read_text()
    chars = sorted(set(text))
    assert tok.decode(train[:200].tolist()) == text[:200]
    assert val[:50].tolist() == [chars.index(c) for c in text[1_003_854 : 1_003_904]]
    again = lmforge("data", "prepare", str(TINYSHAKESPEARE), "--tokenizer", str(tmp_path / "tok"), "--output",
                    str(tmp_path / "data"))
    assert again.returncode == 0 and "already prepared" in again.stderr
    # pretraining reads the prepared directory
    p = lmforge("pretrain", "--recipe", "baby-gpt-shakespeare", "--data.path", str(tmp_path / "data"),
                "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--max-iters", "3",
                "--train.eval_iters", "1", "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr[-1500:]


def test_jsonl_documents_with_bos_eos_and_offsets(tmp_path):
    docs = [f"Lily had a ball number {i}." for i in range(40)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    r = lmforge("data", "prepare", str(f), "--tokenizer", str(STORIES260K_TOKENIZER), "--output", str(tmp_path / "o"),
                "--val-fraction", "0.2", "--workers", "2")
    assert r.returncode == 0, r.stderr
    tok, train, val = load_prepared(tmp_path / "o")
    ref = load_tokenizer(str(STORIES260K_TOKENIZER))
    assert len(train) + len(val) == sum(len(ref.encode(d, bos=True, eos=True)) for d in docs)
    assert 0 < len(val) < len(train)
    offs = document_offsets(tmp_path / "o", "train")
    assert all(train[o] == ref.bos_id for o in offs) and train[-1] == ref.eos_id
    texts = [tok.decode(train[a:b].tolist()) for a, b in zip(offs, list(offs[1:]) + [len(train)])]
    assert set(texts) <= set(docs) and len(texts) == len(offs)


def test_bad_jsonl_line_is_reported_or_skipped(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": oops}\n{"body": "x"}\n')
    r = lmforge("data", "prepare", str(f), "--tokenizer", str(STORIES260K_TOKENIZER), "--output", str(tmp_path / "o"))
    assert r.returncode == 1 and "bad.jsonl:2: invalid JSON" in r.stderr
    assert not (tmp_path / "o").exists()  # nothing half-written
    r = lmforge("data", "prepare", str(f), "--tokenizer", str(STORIES260K_TOKENIZER), "--output", str(tmp_path / "o"),
                "--skip-bad")
    assert r.returncode == 0 and "skipped 2 bad record(s)" in r.stderr


def test_corrupt_shard_is_detected(tmp_path):
    from lmforge.data.prepare import prepare

    f = tmp_path / "a.txt"
    f.write_text("Once upon a time there was a cat. " * 50)
    prepare([str(f)], str(STORIES260K_TOKENIZER), str(tmp_path / "o"), val_fraction=0.0, workers=1)
    data = (tmp_path / "o" / "train.bin").read_bytes()
    (tmp_path / "o" / "train.bin").write_bytes(data[:-2])
    with pytest.raises(LMForgeError, match="truncated or corrupt"):
        load_prepared(tmp_path / "o")
