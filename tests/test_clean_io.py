"""lmforge.data.io.iter_documents: formats, line numbers and one-line errors for bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from lmforge.data.io import BadRecords, iter_documents
from lmforge.errors import LMForgeError


def _w(path, data: bytes):
    path.write_bytes(data)
    return path


def test_jsonl_documents_lines_and_fields(tmp_path):
    p = _w(tmp_path / "a.jsonl", b'{"text": "one", "id": 1}\n\n{"id": 2, "text": "two\\u2028x"}\n{"text": "three"}\n')
    d = list(iter_documents([p]))
    assert [(x.text, x.line, x.meta) for x in d] == [("one", 1, {"id": 1}), ("two\u2028x", 3, {"id": 2}),
                                                     ("three", 4, None)]
    assert d[0].source == str(p) and d[1].where == f"{p}:3"
    g = tmp_path / "a.jsonl.gz"
    g.write_bytes(gzip.compress(p.read_bytes()))
    assert [x.text for x in iter_documents([g])] == ["one", "two\u2028x", "three"]


@pytest.mark.parametrize("line, msg, reason", [
    (b'{"text": "ok"', "malformed JSON", "malformed_json"),
    (b'{"body": "x", "id": 3}', "field 'text' missing (fields: body, id", "missing_field"),
    (b'{"text": 5}', "field 'text' is int, not a string", "not_string"),
    (b'{"text": "   "}', "field 'text': empty document", "empty"),
    (b'["text"]', "not a JSON object", "not_object"),
    ('{"text": "caf\u00e9"}'.encode("latin-1"), "not UTF-8 text (byte 13", "encoding"),
])
def test_bad_jsonl_record_errors_and_skips(tmp_path, line, msg, reason):
    p = _w(tmp_path / "b.jsonl", b'{"text": "good"}\n' + line + b'\n{"text": "after"}\n')
    with pytest.raises(LMForgeError) as e:
        list(iter_documents([p]))
    assert str(e.value).startswith(f"{p}:2: ") and msg in str(e.value) and "\n" not in str(e.value)
    bad = BadRecords(skip=True)
    assert [d.text for d in iter_documents([p], bad=bad)] == ["good", "after"]
    assert bad.count == 1 and bad.reasons == {reason: 1} and bad.examples[0].startswith(f"{p}:2: ")


def test_txt_splits_and_encodings(tmp_path):
    p = _w(tmp_path / "t.txt", "\ufeffFirst line\nsecond line\n\n\nThird\r\nfourth\n".encode())
    assert [(d.text, d.line) for d in iter_documents([p])] == [("First line\nsecond line\n\n\nThird\nfourth\n", 1)]
    assert [(d.text, d.line) for d in iter_documents([p], txt_split="line")] == [
        ("First line", 1), ("second line", 2), ("Third", 5), ("fourth", 6)]
    assert [(d.text, d.line) for d in iter_documents([p], txt_split="paragraph")] == [
        ("First line\nsecond line", 1), ("Third\nfourth", 5)]
    gbk = _w(tmp_path / "gbk.txt", "第一行\n红楼梦\n".encode("gbk"))
    with pytest.raises(LMForgeError, match=rf"^{gbk}:1: not UTF-8 text \(byte 0 of the line is 0xb5"):
        list(iter_documents([gbk]))
    mixed = _w(tmp_path / "m.txt", b"good line\n" + "坏行\n".encode("gbk") + b"fine again\n")
    bad = BadRecords(skip=True)
    assert [d.text for d in iter_documents([mixed], txt_split="line", bad=bad)] == ["good line", "fine again"]
    assert bad.reasons == {"encoding": 1}
    empty = _w(tmp_path / "e.txt", b"\n  \n")
    with pytest.raises(LMForgeError, match="e.txt:1: empty document"):
        list(iter_documents([empty]))
    with pytest.raises(LMForgeError, match="no such input file"):
        list(iter_documents([tmp_path / "missing.txt"]))


def test_json_array_and_parquet(tmp_path):
    p = _w(tmp_path / "a.json", json.dumps([{"text": "x"}, {"content": "y"}]).encode())
    with pytest.raises(LMForgeError, match=r"a.json:2: field 'text' missing \(fields: content"):
        list(iter_documents([p]))
    assert [d.text for d in iter_documents([p], field="content", skip_bad=True)] == ["y"]
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    q = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "gamma"], "url": ["u1", "u2", "u3"]}), q)
    with pytest.raises(LMForgeError, match=r"a.parquet:2: field 'text' is null"):
        list(iter_documents([q]))
    d = list(iter_documents([q], skip_bad=True))
    assert [(x.text, x.line, x.meta) for x in d] == [("alpha", 1, {"url": "u1"}), ("gamma", 3, {"url": "u3"})]
    with pytest.raises(LMForgeError, match=r"field 'body': no such column \(columns: text, url"):
        list(iter_documents([q], field="body"))


def test_raw_text_separator_indices_offsets_and_dropped_empties(tmp_path, monkeypatch):
    import lmforge.data.io as lio

    monkeypatch.setattr(lio, "CHUNK", 5)  # separators and UTF-8 characters straddle the blocks read
    t = _w(tmp_path / "t.txt", "\ufeffone\r\ntwo 红\r\n\r\n \r\n\r\nthree\r\n\r\n".encode())
    j = _w(tmp_path / "j.jsonl", b'\xef\xbb\xbf{"text": "a"}\n{"text": " "}\n{"text": "b"}\n')
    d = list(iter_documents([t, j], txt_split="raw", separator="\r\n\r\n", drop_empty=True))
    assert [(x.text, x.line, x.source_index) for x in d] == [
        ("one\r\ntwo 红", 1, 0), ("three", 6, 0), ("a", 1, 1), ("b", 3, 1)]
    assert d[1].offset == t.stat().st_size and d[3].offset == j.stat().st_size and d[0].offset <= d[1].offset
    assert [x.text for x in iter_documents([t], txt_split="raw")] == ["one\r\ntwo 红\r\n\r\n \r\n\r\nthree\r\n\r\n"]
    with pytest.raises(LMForgeError, match=rf"^{t}:4: empty document"):
        list(iter_documents([t], txt_split="raw", separator="\r\n\r\n"))
    bad_t = _w(tmp_path / "b.txt", b"fine\n\nstill fine\n" + "坏".encode("gbk") + b"\n\nlast\n")
    with pytest.raises(LMForgeError, match=rf"^{bad_t}:4: not UTF-8 text \(byte 0 of the line is 0xbb"):
        list(iter_documents([bad_t], txt_split="raw", separator="\n\n"))
    bad = BadRecords(skip=True)
    assert [x.text for x in iter_documents([bad_t, j], txt_split="raw", bad=bad)] == ["a", "b"]
    assert bad.reasons == {"encoding": 1, "empty": 1}
    with pytest.raises(LMForgeError, match="needs txt_split='raw'"):
        list(iter_documents([t], separator="\n"))
