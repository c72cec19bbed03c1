"""llama.cpp GGUF files without torch: the container (``read_metadata``, ``read_tensors``), exact numpy
dequantization, and the embedded tokenizers; ``lmforge.interop.gguf`` builds models from them.

The container is read by a small parser of its own (``read_metadata``, ``read_tensors``: the header's values, and
each tensor's bytes mapped from the file). The ``gguf`` package's reader (llama.cpp's) makes a numpy view per array
element: 3.6 s and ~80 MB for SmolLM2's 49k-token vocabulary. Tensors are dequantized exactly with numpy (other ggml
types fall back to the package's ``gguf.quants.dequantize``).

The embedded tokenizer becomes a ``GGUFBPETokenizer`` (``tokenizer.ggml.model`` = "gpt2": byte-level BPE with the
pre-tokenizer named by ``tokenizer.ggml.pre``) or a ``GGUFSPMTokenizer`` ("llama": sentencepiece-style merges by
score with byte fallback); both keep ``tokenizer.chat_template`` as ``chat_template``.
"""

from __future__ import annotations

import heapq
import json
import math
import mmap
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LMForgeError
from lmforge.tokenizer.base import Tokenizer
from lmforge.tokenizer.hf import write_tokenizer_json

TOKENIZER_FILE = "tokenizer.gguf"  # a tensor-less GGUF holding only tokenizer metadata (Tokenizer.save)
QK = 32  # block size of Q8_0 / Q4_0 / Q4_1

# ggml type ids (ggml.h / gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", BF16: "BF16"}

# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LMForgeError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    return gguf


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value fields of a GGUF file (what the ``gguf`` package's reader gives), read straight from its header.

    The ``gguf`` package's reader makes a numpy view per array element: for a 49k-token vocabulary that is ~160 MB
    while reading and ~80 MB left behind in the allocator, and 3.6 s for SmolLM2's header. This parser builds only
    the Python values (0.15 s)."""
    return _read_header(Path(path), tensors=False)[0]


class GGUFTensor:
    """One tensor of a GGUF file: ``shape`` as GGUF lists it (ne0, the contiguous dimension, first), the ggml type
    id, and ``data``, its bytes (a read-only view of the mapped file)."""

    __slots__ = ("name", "shape", "tensor_type", "n_elements", "data")

    def __init__(self, name: str, shape: tuple[int, ...], tensor_type: int, data: np.ndarray) -> None:
        self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data
        self.n_elements = math.prod(int(d) for d in shape)  # Python ints: an int64 product wrapped round to 0

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.tensor_type) or _ggml_type_name(self.tensor_type)


def read_tensors(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF file, the tensors' data mapped from the file, not read."""
    path = Path(path)
    meta, infos, start = _read_header(path, tensors=True)
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise LMForgeError(f"{path}: cannot read: {e}") from None
    out = []
    for name, dims, t, offset in infos:
        tensor = GGUFTensor(name, dims, t, mapped[:0])
        size, a = _tensor_bytes(t, tensor.n_elements), start + offset
        if size is None or a + size > mapped.size:
            why = f"ggml type {t} is unknown" if size is None else "its data runs past the end of the file"
            raise LMForgeError(f"{path}: not a readable GGUF file (truncated or damaged): tensor {name!r}: {why}")
        tensor.data = mapped[a : a + size]
        out.append(tensor)
    return meta, out


_BLOCK_BYTES = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (QK, 2 + QK), Q4_0: (QK, 2 + QK // 2),
                Q4_1: (QK, 4 + QK // 2)}  # ggml type -> (elements per block, bytes per block)


def _tensor_bytes(t: int, n: int) -> int | None:
    """Bytes of ``n`` elements of ggml type ``t`` (other types: from the gguf package's table); None if unknown."""
    block = _BLOCK_BYTES.get(t)
    if block is None:
        try:
            gguf = _gguf()
            block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
        except (LMForgeError, ValueError, KeyError):
            return None
    return n // block[0] * block[1]


def _ggml_type_name(t: int) -> str:
    try:
        return _gguf().GGMLQuantizationType(t).name
    except (LMForgeError, ValueError):
        return str(t)


def _read_header(path: Path, tensors: bool) -> tuple[dict[str, Any], list, int]:
    """(metadata, [(name, dims, ggml type, offset)] when ``tensors``, offset of the tensor data)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse_header(data, path, tensors)
    except (OSError, ValueError) as e:  # mmap of an empty file raises ValueError
        raise LMForgeError(f"{path}: cannot read: {e}") from None


def _parse_header(data, path: Path, tensors: bool) -> tuple[dict[str, Any], list, int]:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = data[pos : pos + n]
        if len(s) != n:
            raise EOFError("string past the end of the file")
        pos += n
        return s.decode("utf-8", errors="replace")

    def value(t: int, depth: int = 0):
        nonlocal pos
        if depth > 8:
            raise ValueError("arrays nested more than 8 deep")
        if t == STRING:
            return string()
        if t == ARRAY:
            it, n = take("<I"), take("<Q")
            if it == STRING:  # a vocabulary: 49k strings; this loop is the header's cost
                out, at, end, unpack = [], pos, len(data), struct.unpack_from
                for _ in range(n):
                    (size,) = unpack("<Q", data, at)
                    at += 8
                    if at + size > end:
                        raise EOFError("string past the end of the file")
                    out.append(data[at : at + size].decode("utf-8", errors="replace"))
                    at += size
                pos = at
                return out
            if it in _NP:
                a = np.frombuffer(data, dtype=_NP[it], count=n, offset=pos)
                pos += a.nbytes
                values = a.tolist()
                del a  # no view of the mapping may outlive it
                return values
            return [value(it, depth + 1) for _ in range(n)]  # arrays of arrays
        if t in _SCALARS:
            return take(_SCALARS[t])
        raise ValueError(f"unknown value type {t}")

    try:
        if data[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version = take("<4xI")
        if not 2 <= version <= 3:
            raise ValueError(f"GGUF version {version} (lmforge reads 2 and 3)")
        n_tensors = take("<Q")
        out: dict[str, Any] = {}
        for _ in range(take("<Q")):
            key = string()
            out[key] = value(take("<I"))
        align = out.get("general.alignment", 32)
        if type(align) is not int or align <= 0:
            raise ValueError(f"general.alignment={align!r}")
        infos, seen = [], set()
        if tensors:
            for _ in range(n_tensors):
                name = string()
                n_dims = take("<I")
                if n_dims > 8:  # (ggml's limit is 4)
                    raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
                dims = tuple(take("<Q") for _ in range(n_dims))
                t, offset = take("<I"), take("<Q")
                if name in seen:
                    raise ValueError(f"duplicate tensor name {name!r}")
                if offset % align:
                    raise ValueError(f"tensor {name!r} has offset {offset}, not a multiple of the alignment {align}")
                seen.add(name)
                infos.append((name, dims, t, offset))
        return out, infos, -(-pos // align) * align
    except (ValueError, EOFError, struct.error) as e:
        what = "its header is cut short" if isinstance(e, struct.error) else type(e).__name__  # (struct's is "error")
        raise LMForgeError(f"{path}: not a readable GGUF file (truncated or damaged): {what}: "
                           f"{' '.join(str(e).split())[:200]}") from None


# ---- dequantization (numpy, exact) --------------------------------------------------------------


def _blocks(raw: np.ndarray, n_elements: int, block_bytes: int) -> np.ndarray:
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    n_blocks = n_elements // QK
    if b.size != n_blocks * block_bytes:
        raise ValueError(f"{b.size} bytes for {n_elements} elements (expected {n_blocks * block_bytes})")
    return b.reshape(n_blocks, block_bytes)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(blocks, 16) bytes -> (blocks, 32) values: element j is the low nibble of byte j, element j+16 the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequantize(raw: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """Flat float32 array of ``n_elements`` values from a tensor's raw data."""
    t = int(ggml_type)
    if t == F32:
        return np.ascontiguousarray(raw).view(np.float32).reshape(-1).astype(np.float32, copy=True)
    if t == F16:
        return np.ascontiguousarray(raw).view(np.float16).reshape(-1).astype(np.float32)
    if t == BF16:
        u = np.ascontiguousarray(raw).view(np.uint16).reshape(-1).astype(np.uint32) << 16
        return u.view(np.float32)
    if t in (Q8_0, Q4_0, Q4_1) and n_elements % QK:
        raise ValueError(f"{n_elements} elements is not a multiple of the block size {QK}")
    if t == Q8_0:  # per block: f16 d, 32 x int8 q; w = d * q
        b = _blocks(raw, n_elements, 2 + QK)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)
    if t == Q4_0:  # per block: f16 d, 16 bytes of nibbles; w = d * (q - 8)
        b = _blocks(raw, n_elements, 2 + QK // 2)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
        return (d * q.astype(np.float32)).reshape(-1)
    if t == Q4_1:  # per block: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m
        b = _blocks(raw, n_elements, 4 + QK // 2)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        q = _nibbles(b[:, 4:]).astype(np.float32)
        return (d * q + m).reshape(-1)
    gguf = _gguf()  # K-quants, IQ types...: llama.cpp's reference numpy code
    try:
        qt = gguf.GGMLQuantizationType(t)
        return np.asarray(gguf.quants.dequantize(np.ascontiguousarray(raw), qt), dtype=np.float32).reshape(-1)
    except (ValueError, NotImplementedError) as e:
        raise ValueError(f"ggml type {t} cannot be dequantized: {e}") from None


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def gguf_block_weight_types(path: str | Path) -> set[str]:
    """ggml type names (``Q4_1``, ``F16``...) of the 2-D weights inside the blocks of a GGUF file."""
    return {t.type_name for t in read_tensors(path)[1] if t.name.startswith("blk.") and len(t.shape) == 2}


# ---- tokenizers ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
          r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre -> the regexes llama.cpp (llama-vocab.cpp) applies in turn, each splitting the pieces further
PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [_GPT2],
    "gpt-2": [_GPT2],
    "gpt2": [_GPT2],
    "mpt": [_GPT2],
    "olmo": [_GPT2],
    "jais": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2],
    "codeshell": [r"\p{N}", _GPT2],
    "exaone": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
    "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2],
}
_IGNORE_MERGES = {"llama-bpe", "llama3", "smaug-bpe"}  # llama.cpp: whole-word vocabulary hits skip merging


class _GGUFTokenizerBase(Tokenizer):
    kind = "gguf"

    def __init__(self, meta: dict[str, Any], source: str) -> None:
        tok = "tokenizer.ggml."
        self.meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        self.source = source
        self.tokens: list[str] = list(meta[tok + "tokens"])
        n = len(self.tokens)
        self.types: list[int] = [int(t) for t in meta.get(tok + "token_type", [NORMAL] * n)]
        if len(self.types) != n:
            raise LMForgeError(f"{source}: field {tok}token_type has {len(self.types)} entries for {n} tokens")
        self.vocab_size = n
        self.bos_id = _opt_int(meta.get(tok + "bos_token_id"))
        self.eos_id = _opt_int(meta.get(tok + "eos_token_id"))
        self.pad_id = _opt_int(meta.get(tok + "padding_token_id"))
        self.unk_id = _opt_int(meta.get(tok + "unknown_token_id"))
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self.add_bos = bool(meta.get(tok + "add_bos_token", False))
        self.add_eos = bool(meta.get(tok + "add_eos_token", False))
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        # tokens matched literally in text before the model's own splitting (llama.cpp's parse_special)
        self.specials = sorted((t for t, ty in zip(self.tokens, self.types) if ty in (CONTROL, USER_DEFINED) and t),
                               key=len, reverse=True)

    def _split_specials(self, text: str) -> list[tuple[str, bool]]:
        """[(fragment, is_special)] with special tokens cut out of ``text``, longest match first."""
        if not self.specials or not text:
            return [(text, False)] if text else []
        import re

        pat = re.compile("|".join(re.escape(s) for s in self.specials))
        out: list[tuple[str, bool]] = []
        pos = 0
        for m in pat.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], False))
            out.append((m.group(), True))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], False))
        return out

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = []
        after_special = True  # text at the start or after a special token gets the space prefix (llama.cpp's spm)
        for frag, special in self._split_specials(text):
            if special:
                ids.append(self.token_to_id[frag])
            else:
                ids.extend(self._encode_plain(frag, after_special))
            after_special = special
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        """Write ``tokenizer.gguf`` (this tokenizer's GGUF metadata, no tensors) and ``tokenizer_config.json``."""
        gguf = _gguf()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (TOKENIZER_FILE + ".tmp")
        w = gguf.GGUFWriter(str(tmp), arch="tokenizer")
        for key, value in self.meta.items():
            _add_field(w, gguf, key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(d / TOKENIZER_FILE)
        conf = {"kind": "gguf", "file": TOKENIZER_FILE, "model": self.meta.get("tokenizer.ggml.model"),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "chat_template": self.chat_template, **self._save_hf(d)}
        (d / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")

    def _save_hf(self, d: Path) -> dict[str, Any]:
        """Write what transformers reads beside ``tokenizer.gguf`` (if this kind can); its tokenizer_config keys."""
        return {}


def _add_field(w, gguf, key: str, value: Any) -> None:
    """Write one metadata field with the type llama.cpp uses for it."""
    vt = gguf.GGUFValueType
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, list):
        if key.endswith("token_type"):
            w.add_key_value(key, [int(x) for x in value], vt.ARRAY, sub_type=vt.INT32)
        elif key.endswith("scores"):
            w.add_key_value(key, [float(x) for x in value], vt.ARRAY, sub_type=vt.FLOAT32)
        else:
            w.add_array(key, value)
    else:
        raise LMForgeError(f"tokenizer field {key!r}: cannot write a {type(value).__name__}")


class GGUFBPETokenizer(_GGUFTokenizerBase):
    """Byte-level BPE ("gpt2" in GGUF): llama.cpp's pre-tokenizer regexes, then merges by rank (HF tokenizers)."""

    def __init__(self, meta: dict[str, Any], source: str) -> None:
        super().__init__(meta, source)
        from tokenizers import Regex, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        if pre not in PRE_TOKENIZERS:
            raise LMForgeError(f"{source}: field tokenizer.ggml.pre={pre!r} is not supported; known: "
                               f"{sorted(PRE_TOKENIZERS)}")
        self.pre = pre
        merges = []
        for m in meta.get("tokenizer.ggml.merges", []):
            a, sep, b = m.partition(" ")
            if not sep:
                raise LMForgeError(f"{source}: field tokenizer.ggml.merges: bad merge {m!r}")
            merges.append((a, b))
        vocab = {t: i for i, t in enumerate(self.tokens)}
        model = BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._hf = hf
        b2u = bytes_to_unicode()
        u2b = {c: b for b, c in b2u.items()}
        self._bytes: list[bytes] = []
        chars, byte_of = u2b.keys(), u2b.__getitem__
        for t, ty in zip(self.tokens, self.types):
            if ty == CONTROL:
                self._bytes.append(b"")  # not rendered (llama.cpp without special=true)
            elif ty == USER_DEFINED or not chars >= set(t):
                self._bytes.append(t.encode("utf-8"))
            else:
                self._bytes.append(bytes(map(byte_of, t)))

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[i]

    def _save_hf(self, d: Path) -> dict[str, Any]:
        """``tokenizer.json``: the same BPE and pre-tokenizer, the control and user-defined tokens as added tokens
        (matched in text first, longest first, as here), byte-level decoding; BOS prepended if the GGUF says so."""
        from tokenizers import AddedToken, decoders

        hf = self._hf.__class__.from_str(self._hf.to_str())  # a copy: this tokenizer's own encoder stays as it is
        hf.add_special_tokens([AddedToken(t, special=ty == CONTROL, normalized=False)
                               for t, ty in zip(self.tokens, self.types) if ty in (CONTROL, USER_DEFINED) and t])
        hf.decoder = decoders.ByteLevel()
        add_bos = self.add_bos and self.bos_id is not None
        write_tokenizer_json(hf, d, (self.tokens[self.bos_id], self.bos_id) if add_bos else None)
        name = {i: self.tokens[i] for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i is not None}
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name.get(self.bos_id),
                "eos_token": name.get(self.eos_id), "pad_token": name.get(self.pad_id),
                "unk_token": name.get(self.unk_id), "add_bos_token": self.add_bos, "add_eos_token": self.add_eos}


class GGUFSPMTokenizer(_GGUFTokenizerBase):
    """SentencePiece-style BPE ("llama" in GGUF): merge the adjacent pair whose result scores highest, byte fallback
    for characters outside the vocabulary (llama.cpp's llm_tokenizer_spm)."""

    def __init__(self, meta: dict[str, Any], source: str) -> None:
        super().__init__(meta, source)
        scores = meta.get("tokenizer.ggml.scores")
        self.scores = [float(s) for s in scores] if scores is not None else [0.0] * self.vocab_size
        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        self.byte_ids: dict[int, int] = {}
        for i, (t, ty) in enumerate(zip(self.tokens, self.types)):
            if ty == BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                self.byte_ids[int(t[3:5], 16)] = i
        # merge candidates are the normal and user-defined pieces
        self._mergeable = {t: i for i, (t, ty) in enumerate(zip(self.tokens, self.types))
                           if ty in (NORMAL, USER_DEFINED, UNUSED)}

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        if self.add_space_prefix and at_start:
            text = " " + text
        text = text.replace(" ", "\u2581")
        syms = list(text)
        if not syms:
            return []
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap: list[tuple[float, int, int, str]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if right == -1:
                return
            piece = syms[left] + syms[right]
            i = self._mergeable.get(piece)
            if i is not None:
                heapq.heappush(heap, (-self.scores[i], left, right, piece))

        for i in range(n - 1):
            push(i)
        while heap:
            _, left, right, piece = heapq.heappop(heap)
            if not (alive[left] and alive[right]) or nxt[left] != right or syms[left] + syms[right] != piece:
                continue  # stale: one side was merged into something else meanwhile
            syms[left] = piece
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] != -1:
                prev[nxt[right]] = left
            if prev[left] != -1:
                push(prev[left])
            push(left)
        ids: list[int] = []
        i = 0
        while i != -1:
            s = syms[i]
            tid = self.token_to_id.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                for b in s.encode("utf-8"):
                    bid = self.byte_ids.get(b, self.unk_id)
                    if bid is not None:
                        ids.append(bid)
            i = nxt[i]
        return ids

    def token_bytes(self, i: int) -> bytes:
        t, ty = self.tokens[i], self.types[i]
        if ty == BYTE:
            return bytes([int(t[3:5], 16)])
        if ty in (CONTROL, UNKNOWN, UNUSED):
            return b""
        return t.replace("\u2581", " ").encode("utf-8")

    def decode_bytes(self, ids: list[int]) -> bytes:
        out = b"".join(self.token_bytes(int(i)) for i in ids)
        # sentencepiece drops the dummy-prefix space of the first piece
        lead = next((int(i) for i in ids if self.types[int(i)] not in (CONTROL, UNKNOWN, UNUSED)), None)
        if self.add_space_prefix and lead is not None and out.startswith(b" ") and \
                self.tokens[lead].startswith("\u2581"):
            out = out[1:]
        return out


def tokenizer_from_metadata(meta: dict[str, Any], source: str) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise LMForgeError(f"{source}: no embedded tokenizer (field tokenizer.ggml.tokens is missing)")
    if model == "gpt2":
        return GGUFBPETokenizer(meta, source)
    if model == "llama":
        return GGUFSPMTokenizer(meta, source)
    raise LMForgeError(f"{source}: field tokenizer.ggml.model={model!r}: supported are 'gpt2' (BPE) and 'llama' "
                       f"(sentencepiece)")


def llama2c_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
    """GGUF tokenizer fields ("llama" model) from llama2.c's tokenizer.bin (int32 max length, then per token:
    float32 score, int32 length, bytes); ids 0/1/2 are <unk>/<s>/</s> as in llama2.c's export."""
    from lmforge.tokenizer.llama2c import read_llama2c_tokenizer_bytes

    path = Path(path)
    pieces, scores = read_llama2c_tokenizer_bytes(path.read_bytes(), str(path))
    tokens: list[str] = []
    types: list[int] = []
    for i, raw_piece in enumerate(pieces):
        piece = raw_piece.decode("utf-8", errors="replace")
        if i < 3:
            piece, ty = ["<unk>", "<s>", "</s>"][i], [UNKNOWN, CONTROL, CONTROL][i]
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            ty = BYTE
        else:
            piece, ty = piece.replace(" ", "\u2581"), NORMAL
        tokens.append(piece)
        types.append(ty)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": True}


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer embedded in a .gguf file (or a directory holding ``tokenizer.gguf``)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise LMForgeError(f"{path}: no such file")
    return tokenizer_from_metadata(read_metadata(path), str(path))
