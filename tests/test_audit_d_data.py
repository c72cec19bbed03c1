"""Audit D: `lmforge tokenizer train|encode|decode` and `lmforge data clean|prepare` used carelessly (CRLF files,
inputs inside outputs, settings that do nothing); each test fails without its fix."""

from __future__ import annotations

import json

import pytest
from cli_run import refused

from lmforge.data.prepare import prepare
from lmforge.errors import LMForgeError
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer


def test_char_tokenizer_keeps_carriage_returns(tmp_path):
    """A char vocabulary trained on a CRLF file holds "\\r" (it was read with newlines translated: encoding the
    same file, or preparing it, failed with "character '\\r' is not in the vocabulary")."""
    f = tmp_path / "crlf.txt"
    text = "hello world\r\nsecond line\r\nold mac\rend\r\n"
    f.write_bytes(text.encode())
    train_tokenizer([str(f)], 10, "char", str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.decode(tok.encode(text)) == text
    idx = prepare([str(f)], str(tmp_path / "tok"), str(tmp_path / "data"), val_fraction=0, workers=1, progress=False)
    assert idx["splits"]["train"]["tokens"] == len(text)


def test_char_tokenizer_refuses_special_tokens(tmp_path):
    """--special-tokens with --kind char did nothing (the vocabulary is the text's characters): refused."""
    f = tmp_path / "a.txt"
    f.write_text("some text\n")
    r = refused("tokenizer", "train", "--input", f, "--vocab-size", 10, "--kind", "char", "--output", tmp_path / "t",
                "--special-tokens", "<|im_start|>")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--special-tokens" in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()


def test_prepare_refuses_an_output_holding_an_input(tmp_path):
    """An input inside --output was deleted by --overwrite (the directory is replaced whole); a tokenizer there too.
    The output's own tokenizer copy may be reused."""
    tok = tmp_path / "tok"
    src = tmp_path / "a.txt"
    src.write_text("some text to train on\n" * 20)
    train_tokenizer([str(src)], 300, "bytelevel-bpe", str(tok))
    out = tmp_path / "data"
    prepare([str(src)], str(tok), str(out), val_fraction=0, workers=1, progress=False)
    (out / "more.txt").write_text("precious text\n")
    with pytest.raises(LMForgeError, match="holds the input"):
        prepare([str(out / "more.txt")], str(tok), str(out), val_fraction=0, workers=1, overwrite=True,
                progress=False)
    assert (out / "more.txt").read_text() == "precious text\n"
    (out / "mytok").mkdir()
    for p in tok.iterdir():
        (out / "mytok" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(LMForgeError, match="holds the tokenizer"):
        prepare([str(src)], str(out / "mytok"), str(out), val_fraction=0, workers=1, overwrite=True, progress=False)
    assert (out / "mytok" / "tokenizer.json").is_file()
    idx = prepare([str(src)], str(out / "tokenizer"), str(out), val_fraction=0, workers=1, overwrite=True,
                  progress=False)
    assert json.loads((out / "index.json").read_text())["splits"] == idx["splits"]


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.json", "docs.jsonl.gz"])
def test_tokenizer_trains_on_the_text_of_records(tmp_path, name):
    """A .jsonl/.json corpus (as data prepare takes) was trained on as text: its keys, quotes and \\uXXXX escapes
    (a JSONL file of Chinese written with ensure_ascii gave a vocabulary without one Chinese character)."""
    import gzip

    recs = [{"text": "你好世界，红楼梦", "id": i} for i in range(5)]
    data = (json.dumps(recs) if name == "docs.json" else "".join(json.dumps(r) + "\n" for r in recs)).encode()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    tok = train_tokenizer([str(tmp_path / name)], 10, "char", str(tmp_path / "t"))
    assert sorted(tok.chars) == sorted(set("你好世界，红楼梦\n"))
    bpe = train_tokenizer([str(tmp_path / name)], 300, "llama-bpe")
    assert bpe.decode(bpe.encode("红楼梦")) == "红楼梦" and len(bpe.encode("红楼梦")) < 9  # merged, not 9 bytes
    (tmp_path / "bad.jsonl").write_text('{"text": "a b"}\n{"txt": "c"}\n')
    r = refused("tokenizer", "train", "--input", tmp_path / "bad.jsonl", "--vocab-size", 10, "--kind", "char",
                "--output", tmp_path / "t2")
    assert r.returncode != 0 and r.stderr.startswith("lmforge tokenizer: error: ") and "bad.jsonl:2" in r.stderr


def test_doc_separator_takes_unicode_escapes(tmp_path):
    """--doc-separator '\\u3002' was refused as 'bad escape sequence' (\\u escapes decoded to text that was then
    taken for UTF-8 bytes); typed text, \\n and UTF-8 byte escapes read as before."""
    f = tmp_path / "a.txt"
    f.write_text("一。二。三")
    train_tokenizer([str(f)], 10, "char", str(tmp_path / "t"))
    r = refused("data", "prepare", f, "--tokenizer", tmp_path / "t", "--output", tmp_path / "d", "--val-fraction", 0,
                "--workers", 1, "--doc-separator", r"\u3002")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "d" / "index.json").read_text())["splits"]["train"]["documents"] == 3

    from lmforge.data.prepare_cli import decode_escapes

    assert [decode_escapes(s) for s in (r"\u3002", "。", r"\xe3\x80\x82", r"\n\n", r"\U0001F600", "é")] == [
        "。", "。", "。", "\n\n", "😀", "é"]


def test_a_directory_input_is_named_as_one(tmp_path):
    """A directory given as INPUT was 'no such input file' (data clean and prepare); --workers -1 named no flag."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_text('{"text": "x"}\n')
    for args in (("data", "prepare", tmp_path / "docs", "--tokenizer", tmp_path / "none", "--output", tmp_path / "o"),
                 ("data", "clean", tmp_path / "docs", "--output", tmp_path / "o.jsonl", "--report", tmp_path / "r")):
        r = refused(*args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "docs: is a directory" in r.stderr, r.stderr
    r = refused("data", "clean", tmp_path / "docs" / "a.jsonl", "--output", tmp_path / "o.jsonl", "--report",
                tmp_path / "r", "--workers", -1)
    assert "error: --workers -1: must be in [0, " in r.stderr, r.stderr


def test_llama_bpe_keeps_to_the_vocab_size(tmp_path):
    """A text of many distinct characters (Chinese) gave more tokens than --vocab-size without a word: the trainer
    kept every character; the rare ones now go to byte fallback. A repeated --special-tokens entry is one token."""
    f = tmp_path / "zh.txt"
    text = "".join(chr(0x4E00 + (i * 7) % 400) for i in range(4000)) + "\n"
    f.write_text(text)
    tok = train_tokenizer([str(f)], 300, "llama-bpe", special_tokens=["<a>", "<a>"])
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode(text)) == text
    assert train_tokenizer([str(f)], 261, "llama-bpe", special_tokens=["<a>", "<a>"]).vocab_size == 261


def test_overwrite_keeps_the_old_tokenizer_until_the_new_one_is_written(tmp_path, monkeypatch):
    """--overwrite removed the old tokenizer's files before training: a run that failed or was interrupted (^C) left
    the directory empty. Now the files are replaced at the end, and a tokenizer of another kind leaves none of its
    files behind; a directory made for a failed run is removed."""
    import lmforge.tokenizer.train as train

    f = tmp_path / "a.txt"
    f.write_text("some text to train on\n" * 20)
    out = tmp_path / "tok"
    train_tokenizer([str(f)], 10, "char", str(out))
    before = sorted(p.name for p in out.iterdir())

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_train_bpe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer([str(f)], 300, "llama-bpe", str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer([str(f)], 300, "llama-bpe", str(tmp_path / "new" / "sub"))
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    train_tokenizer([str(f)], 300, "llama-bpe", str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert load_tokenizer(str(out)).kind == "llama-bpe"


def test_clean_refuses_stages_naming_none(tmp_path):
    """--stages '' (or ',') ran no stage at all and reported success: refused."""
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    for stages in ("", ",", " , "):
        r = refused("data", "clean", tmp_path / "a.jsonl", "--output", tmp_path / "o.jsonl", "--report",
                    tmp_path / "r.json", "--stages", stages)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "names no stage" in r.stderr, r.stderr
        assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("cmd", ["prepare", "clean"])
def test_a_bad_first_record_is_one_line(tmp_path, cmd):
    """A run stopped by a bad record said it after a progress bar (two lines on stderr). prepare's bar starts after
    the first batch, clean's after a second."""
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"txt": "y"}\n')
    (tmp_path / "a.txt").write_text("x")
    train_tokenizer([str(tmp_path / "a.txt")], 10, "char", str(tmp_path / "t"))
    more = ("--tokenizer", tmp_path / "t", "--workers", 1) if cmd == "prepare" else ("--report", tmp_path / "r.json")
    out = tmp_path / ("o" if cmd == "prepare" else "o.jsonl")
    r = refused("data", cmd, tmp_path / "a.jsonl", "--output", out, *more)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "a.jsonl:2: field 'text' missing" in r.stderr, r.stderr


def test_a_character_outside_the_vocabulary_is_named_with_its_line(tmp_path):
    """A text the char tokenizer cannot encode was named by file only ('docs.jsonl: character ...'): a million-line
    corpus left the record to be found by hand. Now file:line (the record's line; in a text file the character's)."""
    (tmp_path / "t.txt").write_text("abc\n")
    train_tokenizer([str(tmp_path / "t.txt")], 10, "char", str(tmp_path / "tok"))
    (tmp_path / "a.jsonl").write_text('{"text": "abc"}\n{"text": "ab"}\n{"text": "abQ"}\n')
    (tmp_path / "b.txt").write_text("abc\ncab\n\nbbQ\n")
    for name, where in (("a.jsonl", "a.jsonl:3: "), ("b.txt", "b.txt:4: ")):
        r = refused("data", "prepare", tmp_path / name, "--tokenizer", tmp_path / "tok", "--output", tmp_path / "o",
                    "--workers", 1)
        assert r.returncode == 1 and where + "character 'Q'" in r.stderr, r.stderr


def test_a_rewritten_input_of_the_same_size_is_prepared_again(tmp_path):
    """An input rewritten with the same size (shuffled lines, a fixed typo) was 'already prepared': the old tokens
    were kept with exit 0. The modification time is compared too (an index without times is compared without)."""
    f = tmp_path / "a.txt"
    f.write_text("aaaa bbbb\n")
    train_tokenizer([str(f)], 10, "char", str(tmp_path / "tok"))
    out = tmp_path / "o"
    prepare([str(f)], str(tmp_path / "tok"), str(out), val_fraction=0, workers=1, progress=False)
    again = prepare([str(f)], str(tmp_path / "tok"), str(out), val_fraction=0, workers=1, progress=False)
    assert again == json.loads((out / "index.json").read_text())  # the same file: reused
    f.write_text("bbbb aaaa\n")
    import os

    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(LMForgeError, match="different sources"):
        prepare([str(f)], str(tmp_path / "tok"), str(out), val_fraction=0, workers=1, progress=False)
    idx = json.loads((out / "index.json").read_text())
    for s in idx["sources"]:
        del s["mtime_ns"]
    (out / "index.json").write_text(json.dumps(idx))
    prepare([str(f)], str(tmp_path / "tok"), str(out), val_fraction=0, workers=1, progress=False)  # older index


@pytest.mark.parametrize("index", ["{bad", "[]", '{"sources": 5}'])
def test_a_damaged_index_is_named(tmp_path, index):
    """A damaged index.json in --output gave 'JSONDecodeError: ...' / 'AttributeError' naming no file, with or
    without --overwrite (which could not replace the output)."""
    f = tmp_path / "a.txt"
    f.write_text("abc abc\n")
    train_tokenizer([str(f)], 10, "char", str(tmp_path / "tok"))
    out = tmp_path / "o"
    prepare([str(f)], str(tmp_path / "tok"), str(out), val_fraction=0, workers=1, progress=False)
    (out / "index.json").write_text(index)
    r = refused("data", "prepare", f, "--tokenizer", tmp_path / "tok", "--output", out, "--val-fraction", 0)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Error" not in r.stderr, r.stderr
    assert "index.json: not a prepared dataset's index" in r.stderr or "already prepared from different" in r.stderr
    prepare([str(f)], str(tmp_path / "tok"), str(out), val_fraction=0, workers=1, progress=False, overwrite=True)
    assert json.loads((out / "index.json").read_text())["splits"]["train"]["tokens"] == 8


@pytest.mark.parametrize("name", ["o.jsonl.gz", "o.txt", "o.parquet", "o"])
def test_clean_output_named_as_another_format_is_refused(tmp_path, name):
    """--output o.jsonl.gz wrote plain JSONL under a gzip name (data prepare then failed 'Not a gzipped file'), and
    o.txt / o were read back as text documents of JSON lines: refused before any work."""
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    r = refused("data", "clean", tmp_path / "a.jsonl", "--output", tmp_path / name, "--report", tmp_path / "r.json",
                "--stages", "exact_dedup")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "name it .jsonl" in r.stderr, r.stderr
    assert not (tmp_path / name).exists() and not (tmp_path / "r.json").exists()


def test_encode_names_stdin_and_the_line_of_an_unknown_character(tmp_path, monkeypatch):
    """tokenizer encode with a char vocabulary lacking a character said only "character 'Q' is not in ..."."""
    import io
    import sys

    (tmp_path / "t.txt").write_text("abc\n")
    train_tokenizer([str(tmp_path / "t.txt")], 10, "char", str(tmp_path / "tok"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc\ncabQ\n")))
    r = refused("tokenizer", "encode", "--tokenizer", tmp_path / "tok")
    assert r.returncode == 1 and r.stderr.startswith("lmforge tokenizer: error: stdin:2: character 'Q'"), r.stderr


def test_workers_beyond_the_machine_are_refused(tmp_path):
    """--workers 1000 started a thousand interpreters (each loading the tokenizer or the stages): refused above 4
    per CPU (at least 8), before any work."""
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    a = tmp_path / "a.jsonl"
    for args in (("data", "prepare", a, "--tokenizer", tmp_path / "none", "--output", tmp_path / "o"),
                 ("data", "clean", a, "--output", tmp_path / "o.jsonl", "--report", tmp_path / "r")):
        r = refused(*args, "--workers", 1000)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--workers 1000: must be in [0, " in r.stderr, \
            r.stderr


def test_a_tiktoken_file_replaced_at_the_same_path_is_read_anew(tmp_path, monkeypatch):
    """tiktoken caches the files it reads by their path's text (even local ones): a .tiktoken file replaced at the
    same path (data prepare --overwrite with another tokenizer: its copy in OUT/tokenizer) was read as the old
    ranks, and the data decoded to other text without a word."""
    import base64

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tok" / "tokenizer.tiktoken"
    path.parent.mkdir()

    def write(merges):
        toks = [bytes([b]) for b in range(256)] + merges
        path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(toks)))

    write([])
    assert load_tokenizer(str(path)).encode("ab") == [97, 98]
    write([b"ab"])
    assert load_tokenizer(str(path)).encode("ab") == [256]


@pytest.mark.parametrize("held", ["config.json", "index.json"])
def test_overwrite_refuses_a_model_or_prepared_directory(tmp_path, held):
    """tokenizer train --overwrite into a model (or prepared data) directory replaced the tokenizer its weights (or
    ids) were made with: refused, nothing written."""
    (tmp_path / "a.txt").write_text("some text\n")
    out = tmp_path / "m"
    out.mkdir()
    (out / held).write_text("{}")
    r = refused("tokenizer", "train", "--input", tmp_path / "a.txt", "--vocab-size", 300, "--kind", "bytelevel-bpe",
                "--output", out, "--overwrite")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "holds " in r.stderr and held in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [held]


@pytest.mark.parametrize("args", [
    ("data", "prepare", "a.jsonl", "--tokenizer", "t", "--output", ""),
    ("data", "prepare", "a.jsonl", "--tokenizer", " ", "--output", "o"),
    ("data", "prepare", "", "--tokenizer", "t", "--output", "o"),
    ("data", "clean", "a.jsonl", "--output", "o.jsonl", "--report", ""),
    ("tokenizer", "train", "--input", "", "--vocab-size", "300", "--kind", "char", "--output", "t"),
    ("tokenizer", "encode", "--tokenizer", ""),
])
def test_an_empty_path_is_refused(args):
    """An empty path was the working directory: prepare --output '' said '--output /cwd: holds the input', an empty
    --tokenizer '.: no tokenizer files found'."""
    r = refused(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "must name" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [
    ("data", "prepare", "a.txt", "--tokenizer", "t", "--output", "o", "--field", "body"),
    ("data", "prepare", "a.jsonl", "--tokenizer", "t", "--output", "o", "--doc-separator", "\\n\\n"),
    ("data", "clean", "a.jsonl", "--output", "o.jsonl", "--report", "r.json", "--txt-split", "paragraph"),
    ("data", "clean", "a.txt", "--output", "o.jsonl", "--report", "r.json", "--field", "body"),
    ("tokenizer", "train", "--input", "a.txt", "--vocab-size", "10", "--kind", "char", "--output", "o", "--field", "b"),
    ("tokenizer", "train", "--input", "a.txt", "--vocab-size", "10", "--kind", "char", "--output", "o", "--skip-bad"),
])
def test_a_format_flag_no_input_is_read_with_is_refused(tmp_path, monkeypatch, args):
    """--field with only text inputs, --doc-separator/--txt-split with only JSONL inputs did nothing (a whole .txt
    stayed one document, the records kept their 'text'), with exit 0."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x\n\ny\n")
    (tmp_path / "a.jsonl").write_text('{"text": "x", "body": "y"}\n')
    (tmp_path / "t.txt").write_text("xy\n")
    train_tokenizer(["t.txt"], 10, "char", "t")
    r = refused(*args)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "leave it out" in r.stderr, r.stderr


@pytest.mark.parametrize("cmd", ["prepare", "clean", "train"])
def test_every_record_skipped_is_said_as_such(tmp_path, monkeypatch, cmd):
    """--skip-bad with a wrong --field skipped every record: prepare and tokenizer train said 'the input is empty',
    clean wrote an empty output with exit 0. Now one line: all N records were skipped as bad (first: ...)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    (tmp_path / "t.txt").write_text("xy\n")
    train_tokenizer(["t.txt"], 10, "char", "t")
    args = {"prepare": ("data", "prepare", "a.jsonl", "--tokenizer", "t", "--output", "o", "--workers", 1),
            "clean": ("data", "clean", "a.jsonl", "--output", "o.jsonl", "--report", "r.json"),
            "train": ("tokenizer", "train", "--input", "a.jsonl", "--vocab-size", 10, "--kind", "char", "--output",
                      "o")}[cmd]
    r = refused(*args, "--field", "body", "--skip-bad")
    assert r.returncode == 1 and "all 2 records were skipped as bad (first: a.jsonl:1: field 'body'" in r.stderr, \
        r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("case", ["output-eval", "report-eval", "report-config", "report-config-eval"])
def test_clean_never_replaces_its_eval_sets_or_config(tmp_path, monkeypatch, case):
    """--output/--report naming an --eval file (or the --config, or an eval file the config names) replaced it with
    --overwrite: the evaluation set was lost. Refused before any work."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "some words here"}\n')
    (tmp_path / "ev.jsonl").write_text('{"text": "held-out question"}\n')
    (tmp_path / "c.yaml").write_text("stages: [decontaminate: {eval_files: [ev.jsonl]}]\n")
    out, rep, more = {"output-eval": ("ev.jsonl", "r.json", ("--eval", "ev.jsonl")),
                      "report-eval": ("o.jsonl", "ev.jsonl", ("--eval", "ev.jsonl")),
                      "report-config": ("o.jsonl", "c.yaml", ("--config", "c.yaml")),
                      "report-config-eval": ("o.jsonl", "ev.jsonl", ("--config", "c.yaml"))}[case]
    r = refused("data", "clean", "a.jsonl", "--output", out, "--report", rep, *more, "--overwrite", "--quiet")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "which is being read" in r.stderr, r.stderr
    assert (tmp_path / "ev.jsonl").read_text() == '{"text": "held-out question"}\n'
    assert (tmp_path / "c.yaml").read_text().startswith("stages:")


def test_records_text_is_written_beside_the_output_not_in_tmp(tmp_path, monkeypatch):
    """The text of a JSONL corpus was written to the system's temporary directory for the trainer (a small or full
    /tmp failed with an OSError); it goes beside --output, on the disk the user chose, and is removed."""
    import tempfile

    (tmp_path / "a.jsonl").write_text('{"text": "some words"}\n')
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    train_tokenizer([str(tmp_path / "a.jsonl")], 300, "llama-bpe", str(tmp_path / "out" / "tok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]


def test_a_prepared_dataset_as_tokenizer_names_its_tokenizer(tmp_path):
    """--tokenizer DATA (a prepared dataset) said only 'no tokenizer files found': it names DATA/tokenizer."""
    (tmp_path / "a.txt").write_text("abc\n")
    train_tokenizer([str(tmp_path / "a.txt")], 10, "char", str(tmp_path / "tok"))
    prepare([str(tmp_path / "a.txt")], str(tmp_path / "tok"), str(tmp_path / "d"), val_fraction=0, workers=1,
            progress=False)
    r = refused("data", "prepare", tmp_path / "a.txt", "--tokenizer", tmp_path / "d", "--output", tmp_path / "d2")
    assert r.returncode == 1 and f"its tokenizer is {tmp_path / 'd' / 'tokenizer'}" in r.stderr, r.stderr


def test_data_without_a_step_is_one_line():
    """`lmforge data` alone printed the whole top-level help (every command) with exit 2; `lmforge tokenizer` alone
    says in one line that a STEP is needed, and now data does too."""
    r = refused("data")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "required: STEP" in r.stderr and not r.stdout, r


def test_prepare_adds_bos_only_where_the_tokenizer_starts_a_text_with_it(tmp_path):
    """A tokenizer with a BOS it does not add (SmolLM2's GGUF: add_bos_token=false, BOS <|im_start|>) got it before
    every document: the model was pretrained on an unclosed ChatML turn per document. transformers and llama.cpp
    encode such text without it; --bos still adds it."""
    import numpy as np

    from lmforge.tokenizer import Tokenizer

    class NoBos(Tokenizer):
        vocab_size, bos_id, eos_id, add_bos = 30, 1, 2, False

        def encode(self, text, bos=False, eos=False):
            return self._add_special([3 + ord(c) - ord("a") for c in text], bos, eos)

        def decode(self, ids):
            return "".join(chr(i - 3 + ord("a")) for i in ids if i > 2)

    (tmp_path / "a.jsonl").write_text('{"text": "ab"}\n{"text": "cd"}\n')
    idx = prepare([str(tmp_path / "a.jsonl")], NoBos(), str(tmp_path / "o"), val_fraction=0, progress=False)
    assert not idx["bos"] and idx["eos"]
    assert np.fromfile(tmp_path / "o" / "train.bin", dtype="<u2").tolist() == [3, 4, 2, 5, 6, 2]
    idx = prepare([str(tmp_path / "a.jsonl")], NoBos(), str(tmp_path / "o2"), val_fraction=0, bos=True,
                  progress=False)
    assert np.fromfile(tmp_path / "o2" / "train.bin", dtype="<u2").tolist() == [1, 3, 4, 2, 1, 5, 6, 2]


@pytest.mark.parametrize("files", [
    {"char_vocab.json": "{bad", "tokenizer_config.json": '{"kind": "char"}'},
    {"char_vocab.json": '["a", "a", "b"]', "tokenizer_config.json": '{"kind": "char"}'},
    {"char_vocab.json": '["ab", "c"]', "tokenizer_config.json": '{"kind": "char"}'},
    {"tokenizer.json": None, "tokenizer_config.json": "[1]"},
    {"tokenizer.json": None, "tokenizer_config.json": '{"bos_token": 5}'},
])
def test_a_damaged_tokenizer_directory_is_one_line_naming_the_file(tmp_path, files):
    """A damaged char_vocab.json was a JSONDecodeError naming no file (or taken: a repeated or multi-character entry
    gave ids encode could not make), a tokenizer_config.json list or an int bos_token an AttributeError/TypeError."""
    (tmp_path / "a.txt").write_text("abc\n")
    good = train_tokenizer([str(tmp_path / "a.txt")], 300, "llama-bpe", str(tmp_path / "good"))
    assert good.vocab_size
    d = tmp_path / "tok"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text((tmp_path / "good" / name).read_text() if text is None else text)
    r = refused("data", "prepare", tmp_path / "a.txt", "--tokenizer", d, "--output", tmp_path / "o")
    bad = "char_vocab.json" if "char_vocab.json" in files else "tokenizer_config.json"
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"{d / bad}: " in r.stderr, r.stderr
    assert "Error" not in r.stderr, r.stderr


@pytest.mark.parametrize("damage", ["no-splits", "splits-list", "tokens-text", "no-dtype", "no-vocab", "a-list"])
def test_a_damaged_prepared_index_is_one_line(tmp_path, damage):
    """Opening prepared data (pretrain --data.path) with a damaged index.json was a KeyError/AttributeError/
    ValueError naming no file."""
    from lmforge.data.dataset import load_prepared

    (tmp_path / "a.txt").write_text("abc abc\n")
    train_tokenizer([str(tmp_path / "a.txt")], 10, "char", str(tmp_path / "tok"))
    d = tmp_path / "d"
    idx = prepare([str(tmp_path / "a.txt")], str(tmp_path / "tok"), str(d), val_fraction=0, workers=1,
                  progress=False)
    train = {**idx["splits"]["train"], "tokens": "x"}
    bad = {"no-splits": {k: v for k, v in idx.items() if k != "splits"}, "splits-list": {**idx, "splits": []},
           "tokens-text": {**idx, "splits": {**idx["splits"], "train": train}},
           "no-dtype": {k: v for k, v in idx.items() if k != "dtype"},
           "no-vocab": {k: v for k, v in idx.items() if k != "vocab_size"}, "a-list": [1]}[damage]
    (d / "index.json").write_text(json.dumps(bad))
    with pytest.raises(LMForgeError, match=f"^{d / 'index.json'}: "):
        load_prepared(d)


@pytest.mark.parametrize("cmd", ["prepare", "clean", "train"])
def test_a_lone_surrogate_is_a_bad_record(tmp_path, monkeypatch, cmd):
    """A JSON record whose text holds a lone surrogate ("\\ud800": half an emoji, common in scraped data) crashed
    prepare ('TypeError: TextEncodeInput must be ...', a pybind11 RuntimeError), clean and tokenizer train
    (UnicodeEncodeError), naming no file. Now a bad record (file:line; --skip-bad skips it); clean keeps a surrogate
    of another field as the escape it was read as."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "ok doc", "m": "x\\udc00"}\n{"text": "bad \\ud800 here"}\n')
    (tmp_path / "t.txt").write_text("ok dc\n")
    train_tokenizer(["t.txt"], 300, "llama-bpe", "t")
    args = {"prepare": ("data", "prepare", "a.jsonl", "--tokenizer", "t", "--output", "o", "--workers", 1),
            "clean": ("data", "clean", "a.jsonl", "--output", "o.jsonl", "--report", "r.json", "--stages", "pii"),
            "train": ("tokenizer", "train", "--input", "a.jsonl", "--vocab-size", 300, "--kind", "llama-bpe",
                      "--output", "o")}[cmd]
    r = refused(*args)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "a.jsonl:2: field 'text' holds a lone surrogate" \
        in r.stderr, r.stderr
    r = refused(*args, "--skip-bad")
    assert r.returncode == 0, r.stderr
    if cmd == "clean":
        assert json.loads((tmp_path / "o.jsonl").read_text()) == {"text": "ok doc", "m": "x\udc00"}


def test_a_bad_evaluation_record_gives_advice_that_applies(tmp_path, monkeypatch):
    """A bad record of an --eval file advised '--skip-bad' (which does not apply to evaluation files: it still
    failed) and '--field' (the stage's eval_field picks their field)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "some words here"}\n')
    (tmp_path / "ev.jsonl").write_text('{"question": "q"}\n')
    r = refused("data", "clean", "a.jsonl", "--output", "o.jsonl", "--report", "r.json", "--eval", "ev.jsonl",
                "--skip-bad")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "ev.jsonl:1: field 'text' missing" in r.stderr, r.stderr
    assert "--skip-bad" not in r.stderr and "--field" not in r.stderr and "eval_field" in r.stderr, r.stderr


@pytest.mark.parametrize("more", [("--split-mode", "tail"), ("--val-fraction", "0")])
def test_prepare_seed_that_does_nothing_is_refused(tmp_path, more):
    """--seed seeds the split by document only: with --split-mode tail or --val-fraction 0 it did nothing."""
    (tmp_path / "a.txt").write_text("abc\n")
    r = refused("data", "prepare", tmp_path / "a.txt", "--tokenizer", tmp_path / "t", "--output", tmp_path / "o",
                "--seed", 5, *more)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--seed 5: seeds the split by document only" in \
        r.stderr, r.stderr


@pytest.mark.parametrize("yaml", ["stages: [near_dedup: {threshold: .nan}]", "stages: [lang: {min_score: .nan}]",
                                  "stages: [lang: {languages: []}]", "stages: []"])
def test_clean_stage_options_that_decide_nothing_are_refused(tmp_path, monkeypatch, yaml):
    """A NaN stage option passed the range check (every comparison with NaN is false) and the stage then kept or
    removed without deciding; lang with languages: [] removed every document. Refused naming the config."""
    pytest.importorskip("py3langid")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "some words here"}\n')
    (tmp_path / "c.yaml").write_text(yaml + "\n")
    r = refused("data", "clean", "a.jsonl", "--output", "o.jsonl", "--report", "r.json", "--config", "c.yaml")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "c.yaml: stage" in r.stderr, r.stderr


def test_tokenizer_output_a_dangling_link_says_so(tmp_path):
    """--output naming a symbolic link to nothing said 'cannot write the tokenizer there: File exists'."""
    (tmp_path / "a.txt").write_text("abc\n")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    r = refused("tokenizer", "train", "--input", tmp_path / "a.txt", "--vocab-size", 10, "--kind", "char",
                "--output", tmp_path / "link")
    assert r.returncode == 1 and "a symbolic link to" in r.stderr and "which does not exist" in r.stderr, r.stderr


def test_clean_reads_a_file_whose_name_is_not_utf8(tmp_path):
    """An input named in GBK (bytes that are not UTF-8: Python holds them as surrogates) made data clean fail after
    the work with 'UnicodeEncodeError: ... surrogates not allowed' writing the report; it is written with escapes."""
    import os

    name = os.fsdecode(os.fsencode(tmp_path) + b"/\xc4\xe3\xba\xc3.jsonl")
    with open(os.fsencode(name), "w") as f:
        f.write('{"text": "some words here"}\n')
    r = refused("data", "clean", name, "--output", tmp_path / "o.jsonl", "--report", tmp_path / "r.json",
                "--stages", "pii", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["inputs"] == [name]


def test_decode_writes_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """tokenizer decode wrote through the locale's encoding: with a latin-1 (or GBK) stdout '你好' or an emoji was
    'UnicodeEncodeError'; encode reads stdin as UTF-8, so decode writes UTF-8."""
    import argparse
    import io
    import sys

    from lmforge.commands.tokenizer import run_decode

    (tmp_path / "t.txt").write_text("你好 😀\n")
    tok = train_tokenizer([str(tmp_path / "t.txt")], 10, "char", str(tmp_path / "tok"))
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(tok.encode("你好 😀")).encode())))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1"))
    run_decode(argparse.Namespace(tokenizer=str(tmp_path / "tok")))
    assert raw.getvalue().decode("utf-8") == "你好 😀"


def test_hf_tokenizer_in_a_directory_whose_name_is_not_utf8(tmp_path):
    """A byte-level/llama-bpe tokenizer could not be saved or read under a GBK-named directory ('UnicodeEncodeError:
    ... surrogates not allowed while processing path': the tokenizers library takes UTF-8 paths only), so data prepare
    into such a --output failed; files are written and read by Python now."""
    import os

    (tmp_path / "a.txt").write_text("some text to train on\n" * 5)
    tok = train_tokenizer([str(tmp_path / "a.txt")], 300, "llama-bpe")
    d = os.fsdecode(os.fsencode(tmp_path) + b"/\xc4\xe3")
    prepare([str(tmp_path / "a.txt")], tok, d, val_fraction=0, progress=False)
    tok.save(d + "/tok")
    assert load_tokenizer(d + "/tok").encode("some text") == tok.encode("some text")
    assert load_tokenizer(d + "/tokenizer").encode("some text") == tok.encode("some text")


@pytest.mark.parametrize("kind", ["llama-bpe", "bytelevel-bpe"])
def test_bpe_trains_on_a_file_whose_name_is_not_utf8(tmp_path, kind):
    """A GBK-named --input failed BPE training ('surrogates not allowed': the trainer takes UTF-8 paths only)."""
    import os

    name = os.fsdecode(os.fsencode(tmp_path) + b"/\xc4\xe3.txt")
    with open(os.fsencode(name), "w") as f:
        f.write("some text to train on\n" * 5)
    assert train_tokenizer([name], 300, kind).vocab_size > 256


def test_documents_packed_with_nothing_between_them_are_said(tmp_path, monkeypatch):
    """With a tokenizer without BOS and EOS (char), documents were glued end to start ('...end.Start') silently."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "ab"}\n{"text": "ba"}\n')
    (tmp_path / "t.txt").write_text("ab")
    train_tokenizer(["t.txt"], 10, "char", "t")
    r = refused("data", "prepare", "a.jsonl", "--tokenizer", "t", "--output", "o", "--workers", 1)
    assert r.returncode == 0 and "packed with nothing between them" in r.stderr, r.stderr
    r = refused("data", "prepare", "a.jsonl", "--tokenizer", "t", "--output", "o2", "--workers", 1, "--no-eos")
    assert r.returncode == 0 and "nothing between" not in r.stderr, r.stderr  # asked for: not said


def test_a_tokenizer_file_of_a_directory_names_the_directory(tmp_path):
    """--tokenizer tok/tokenizer.json said only 'unknown tokenizer format (expected a directory, ...)'."""
    (tmp_path / "a.txt").write_text("abc\n")
    train_tokenizer([str(tmp_path / "a.txt")], 300, "bytelevel-bpe", str(tmp_path / "tok"))
    r = refused("data", "prepare", tmp_path / "a.txt", "--tokenizer", tmp_path / "tok" / "tokenizer.json", "--output",
                tmp_path / "o")
    assert r.returncode == 1 and f"give its directory {tmp_path / 'tok'}" in r.stderr, r.stderr


def test_tokenizer_hash_streams_the_files(tmp_path, monkeypatch):
    """tokenizer_hash read every file whole (Path.read_bytes): a GGUF model given as --tokenizer, or a model
    directory, was read into memory at once. Same digest, read in blocks."""
    import hashlib
    from pathlib import Path

    from lmforge.data.prepare import tokenizer_hash

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "d" / "b.json").write_text("{}")
    want_dir = hashlib.sha256(b"a.bin" + b"x" * 100 + b"b.json" + b"{}").hexdigest()
    want_file = hashlib.sha256(b"x" * 100).hexdigest()

    def whole(self):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)
    assert tokenizer_hash(tmp_path / "d") == want_dir
    assert tokenizer_hash(tmp_path / "d" / "a.bin") == want_file


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_json_nested_too_deep_is_a_bad_record(tmp_path, name):
    """Arrays nested 100,000 deep were 'RecursionError: maximum recursion depth exceeded ...' naming no file."""
    (tmp_path / name).write_text(('{"text": ' if name.endswith("l") else "") + "[" * 100_000 + "\n")
    (tmp_path / "a.txt").write_text("abc\n")
    train_tokenizer([str(tmp_path / "a.txt")], 10, "char", str(tmp_path / "t"))
    r = refused("data", "prepare", tmp_path / name, "--tokenizer", tmp_path / "t", "--output", tmp_path / "o")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"{name}" in r.stderr and "malformed JSON" in \
        r.stderr, r.stderr
