"""Decoding an int4 directory (``lmforge quantize --bits 4``) in a process without PyTorch.

``import torch`` alone makes a process 219 MB resident, more than a 135M-parameter model's int4 weights (108 MB).
The decoding step of such a model is already C from end to end (``native.c``: int4 products on integer dot products,
norms, rotary attention over the cache, activations, the int8 output projection with its top candidates recomputed
exactly), so here it is driven from numpy arrays instead of PyTorch tensors: the same C calls in the same order on
the same weights, laid out as ``lmforge.infer.native`` lays them out. The safetensors file is mapped, not read: the
int4 layers are rearranged into the kernel's layout once (the file's pages are let go after), and the embedding table
stays mapped (a token reads one row of it). SmolLM2-135M-Instruct: about 180 MB resident against 470 MB for the same
directory through PyTorch (``benchmarks/bench_quant.py``).

``lmforge generate`` takes this path for an int4 directory on a CPU with AVX512-VNNI (``unsupported`` says why not
otherwise, and the PyTorch path runs); ``--runtime torch`` keeps PyTorch. Greedy decoding gives the tokens the
PyTorch path gives; sampling draws from the same distribution with numpy's generator, so a ``--seed`` gives other
samples than under PyTorch.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmforge.config import ModelConfig
from lmforge.errors import LMForgeError
from lmforge.infer import clib, lean_sampling
from lmforge.infer.batching import BatchEngine
from lmforge.infer.clib import (
    ACTIVATION_CODES,
    REFINE_TOP,
    _ActArgs,
    _AttnArgs,
    _HeadArgs,
    _Int4Args,
    _NormArgs,
    _VnniArgs,
)
from lmforge.manifest import verify_manifest
from lmforge.mapped import SafetensorsMap
from lmforge.quant_config import QUANT_FILE, QuantConfig, read_quant_config

CONFIG, WEIGHTS = "config.json", "model.safetensors"  # as lmforge.model.weights
PREFILL_ROWS = 64  # prompt tokens per step of the prefill (rows of one call)
_NORMS = {"rmsnorm": 1, "layernorm": 2}  # native.c's norm kinds
_LINEAR = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # a block's linear layers


def _aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose data starts on a 64-byte boundary (as PyTorch's allocations do)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off : off + n].view(dtype).reshape(shape)


def _lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeroed memory whose pages are taken only as they are written: an anonymous mapping without huge
    pages (numpy asks for huge pages on large arrays; a chat's first tokens then took 2 MB per layer and head of the
    key/value cache: 360 MB for SmolLM2's 8,192 positions)."""
    n, dtype = int(np.prod(shape)), np.dtype(dtype)
    m = mmap.mmap(-1, max(dtype.itemsize * n, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype, n).reshape(shape)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _inspect(path: Path) -> tuple[str | None, ModelConfig | None, QuantConfig | None]:
    """(why the directory cannot decode here without PyTorch or None, its model config, its quantization config)."""
    if not (path / QUANT_FILE).is_file():
        return ("not an lmforge quantize directory (make one: lmforge quantize --model MODEL --bits 4 --output DIR; a "
                "GGUF's Q4_1 weights are kept exactly)"), None, None
    try:
        q, layers = read_quant_config(path)
        cfg = ModelConfig.load(path / CONFIG)
    except (OSError, ValueError, LMForgeError) as e:
        return f"unreadable: {e}", None, None
    if q.bits != 4 or not q.embedding:
        return "not int4 with an int8 embedding table", cfg, q
    if not cfg.tie_embeddings:  # (int4 where quantized: PyTorch's path computes it another way)
        return "an untied output projection", cfg, q
    if sorted(layers) != sorted(f"blocks.{i}.{k}" for i in range(cfg.n_layer) for k in _LINEAR):
        return "not every linear layer of the blocks int4", cfg, q
    if cfg.position not in ("rope", "none") or cfg.norm_placement != "pre" or cfg.parallel_block:
        return f"{cfg.position} positions / {cfg.norm_placement} norms / parallel blocks", cfg, q
    if cfg.attn_pattern != "dense" or cfg.embedding_norm or cfg.rmsnorm_unit_offset or not cfg.final_norm:
        return "local attention, an embedding norm, unit-offset or no final norm", cfg, q
    if cfg.mlp not in ACTIVATION_CODES or cfg.n_head % cfg.kv_heads or cfg.norm not in _NORMS:
        return f"{cfg.mlp} MLP / {cfg.n_head} heads over {cfg.kv_heads} / {cfg.norm}", cfg, q
    if cfg.position == "rope" and cfg.rotary_dim % 2:
        return "an odd rotary dimension", cfg, q
    if cfg.n_embd % 32 or cfg.vocab_size % 16:
        return "widths the int8 head kernel does not take", cfg, q
    lib = clib.library()
    if lib is None:
        return "no C compiler (or LMFORGE_NATIVE=0)", cfg, q
    if not lib.lmf_vnni_ok():
        return "no AVX512-VNNI on this CPU", cfg, q
    return None, cfg, q


def unsupported(path: str | Path) -> str | None:
    """Why the directory cannot decode here without PyTorch, or None if it can."""
    return _inspect(Path(path))[0]


class LeanModel:
    """An int4 directory ready to decode with the C step: ``slots`` sequences of up to ``max_len`` positions each in
    its key/value cache (``run``), the first of them also as one sequence (``step``, ``prefill``). ``kv_dtype``: the
    cache's, "float16" (half the bytes attention reads, as llama.cpp keeps it; float32 where the library cannot) or
    "float32" (the PyTorch runtime's: the same numbers)."""

    def __init__(self, path: str | Path, max_len: int | None = None, slots: int = 1,
                 kv_dtype: str = "float16") -> None:
        path = Path(path)
        why, cfg, q = _inspect(path)
        if why:
            raise LMForgeError(f"{path}: cannot decode without PyTorch: {why}")
        problem = verify_manifest(path)
        if problem:
            raise LMForgeError(f"{path}: damaged quantized directory: {problem}")
        self.lib = clib.library()
        self.cfg = cfg
        self.max_len = min(max_len or cfg.block_size, cfg.block_size)
        self.group, self.slots = q.group_size, slots
        if kv_dtype not in ("float16", "float32"):
            raise LMForgeError(f"key/value cache dtype {kv_dtype!r}: float16 or float32")
        self.kv_dtype = np.dtype(np.float16 if kv_dtype == "float16" and self.lib.lmf_kv_half_ok() else np.float32)
        self._plan(*self._load(path, q.symmetric))
        self.length = 0  # positions of the sequence in the cache

    def _load(self, path: Path, symmetric: bool) -> tuple[list, tuple, tuple]:
        """The weights: each block's int4 layers in lmf_int4's layout and its norms, the final norm, and the int8 head
        interleaved for lmf_head_vnni; the embedding table (also the head's rows) mapped, the file checked."""
        cfg = self.cfg
        D, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
        f = _layer_widths(cfg, self.group)
        wf = SafetensorsMap(path / WEIGHTS)
        try:
            norm_w = lambda name: self._float(wf, name, (D,))  # noqa: E731
            layers = []
            for i in range(L):
                b = f"blocks.{i}"
                lin = {k: self._int4(wf, f"{b}.{k}", n, Kp, symmetric, bias)
                       for k, (n, Kp, bias) in f.items()}
                norms = [(norm_w(f"{b}.norm{j}.weight"),
                          norm_w(f"{b}.norm{j}.bias") if cfg.norm == "layernorm" and cfg.norm_bias else None)
                         for j in (1, 2)]
                layers.append((lin, norms))
                wf.release()
            final = (norm_w("norm_f.weight"),
                     norm_w("norm_f.bias") if cfg.norm == "layernorm" and cfg.norm_bias else None)
            hq = wf.get("wte.qweight", "I8", (V, D))  # the tied output projection's weight
            self.scales = self._float(wf, "wte.scales", (V,))  # per row: the embedding's and the tied head's
            self.head_bias = self._float(wf, "lm_head.bias", (V,)) if cfg.lm_head_bias else None
            qi = _aligned((V // 16, D // 4, 16, 4), np.int8)  # lmf_head_vnni's interleaving (native._vnni_head)
            qi[:] = hq.reshape(V // 16, 16, D // 4, 4).transpose(0, 2, 1, 3)
            qsum = _aligned((V // 16, D // 32, 16), np.int32)
            qsum[:] = (hq.reshape(V // 16, 16, D // 32, 32).sum(-1, dtype=np.int32) * 128).transpose(0, 2, 1)
            del hq
            extra = sorted(set(wf.header) - wf.read)
            if extra:
                raise LMForgeError(f"{path / WEIGHTS}: unexpected tensor {extra[0]!r} ({len(extra)} unused): "
                                   f"{QUANT_FILE} does not describe this file")
        finally:
            wf.close()
        # mapped again, untouched: a token reads one row of the table (and the head's exact top candidates theirs)
        self._wmap = SafetensorsMap(path / WEIGHTS)
        self.emb = self._wmap.get("wte.qweight", "I8", (V, D))
        floats = [self.scales, self.head_bias, *final]
        for lin, norms in layers:  # norms, and int4 scales, zeros and biases
            floats += [x for t in norms for x in t] + [y for v in lin.values() for y in v[1:]]
        if any(a is not None and not np.isfinite(a).all() for a in floats):
            raise LMForgeError(f"{path / WEIGHTS}: non-finite weights (damaged)")
        return layers, final, (qi, qsum)

    def _plan(self, layers: list, final: tuple, head: tuple) -> None:
        """The cache, the buffers and the C calls' argument blocks (as NativeStep plans them)."""
        cfg, lib, G = self.cfg, self.lib, self.group
        D, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
        nh, nkv, hd = cfg.n_head, cfg.kv_heads, cfg.head_size
        R = self.rows = max(PREFILL_ROWS, self.slots)  # rows of one call at most
        f = _layer_widths(cfg, G)
        qi, qsum = head
        half = self.kv_dtype == np.float16
        self.k = _lazy_zeros((L, self.slots, nkv, self.max_len, hd), self.kv_dtype)  # (pages taken as written)
        self.v = _lazy_zeros((L, self.slots, nkv, self.max_len, hd), self.kv_dtype)
        self.top = 0  # positions written in some slot (their pages taken)
        self.pos, self.slot = np.zeros(R, np.int32), np.zeros(R, np.int32)
        self.x, self.final = _aligned((R, D), np.float32), _aligned((R, D), np.float32)
        Nmax = max(n + -n % 16 for n, _, _ in f.values())
        Kmax = max(K for _, K, _ in f.values())
        self.out = _aligned((R * Nmax,), np.float32)
        self.xq, self.xs = _aligned((2 * R * Kmax,), np.int8), _aligned((R * Kmax // 32 * 3,), np.float32)
        # each product's input buffer, shared by the products of one real and padded width: only the real columns
        # are ever written, so the padding stays zero (asymmetric products multiply it by zero points)
        widths = {"attn.qkv": D, "attn.proj": nh * hd, "mlp.fc1": D, "mlp.fc2": cfg.hidden_size}
        self.inputs = {(widths[k], K): _aligned((R, K), np.float32) for k, (_, K, _) in f.items()}
        rd = cfg.rotary_dim if cfg.position == "rope" else 0
        self.cos, self.sin = _rotary(rd, self.max_len, cfg.rope_theta, cfg.rope_interleaved) if rd else (None, None)
        self.attn_tmp = _aligned(((nh + 2 * nkv) * hd + nh // nkv * (self.max_len + hd)  # native.attn_floats
                                  + (2 * self.max_len * hd if half else 0),), np.float32)
        self.norm_tmp = _aligned((D,), np.float32)
        self.act_tmp = _aligned((2 * cfg.hidden_size,), np.float32)
        keep, self._blocks = [], []  # argument blocks (and arrays) the C side points into

        def norm_args(w, b, out, added):
            y_stride, y_bias = (0, None) if added is None else (added[0] + -added[0] % 16, added[1])
            a = _NormArgs(n=R, d=D, kind=_NORMS[cfg.norm], y_bf=0, out_bf=0, y_stride=y_stride,
                          out_stride=out.shape[1], eps=cfg.norm_eps, x=_ptr(self.x), y_bias=_ptr(y_bias), w=_ptr(w),
                          b=_ptr(b), out=_ptr(out), tmp=_ptr(self.norm_tmp))
            keep.append(a)
            return a

        def product(w, s, z, half, n, K, bias):
            Np = n + -n % 16
            a = _Int4Args(n=R, N=Np, K=K, G=G, x_stride=K, out_stride=Np, w=_ptr(w), scales=_ptr(s), zeros=_ptr(z),
                          out=_ptr(self.out), xq=_ptr(self.xq), xs=_ptr(self.xs), half=int(half))
            keep.append(a)
            return a

        scale = cfg.attn_scale if cfg.attn_scale is not None else hd ** -0.5
        for i, (lin, norms) in enumerate(layers):
            qkv, proj, fc1 = lin["attn.qkv"], lin["attn.proj"], lin["mlp.fc1"]
            p = [product(*lin[k][:3], lin[k][4], *f[k]) for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
            h_qkv, h_proj, h_fc1, h_fc2 = (self.inputs[widths[k], f[k][1]]
                                           for k in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
            first = norm_args(*norms[0], h_qkv, None if i == 0 else (f["mlp.fc2"][0], layers[i - 1][0]["mlp.fc2"][3]))
            n_qkv = f["attn.qkv"][0]
            attn = _AttnArgs(n=R, nh=nh, nkv=nkv, hd=hd, rd=rd, interleaved=int(cfg.rope_interleaved),
                             max_len=self.max_len, y_bf=0, out_bf=0, y_stride=n_qkv + -n_qkv % 16,
                             out_stride=h_proj.shape[1], scale=scale, pos=_ptr(self.pos), slot=_ptr(self.slot),
                             cos=_ptr(self.cos), sin=_ptr(self.sin), bias=_ptr(qkv[3]), k=_ptr(self.k[i]),
                             v=_ptr(self.v[i]), out=_ptr(h_proj), tmp=_ptr(self.attn_tmp), kv_half=int(half))
            norm2 = norm_args(*norms[1], h_fc1, (f["attn.proj"][0], proj[3]))
            n_fc1 = f["mlp.fc1"][0]
            act = _ActArgs(n=R, f=cfg.hidden_size, gated=int(cfg.gated),
                           act=ACTIVATION_CODES[cfg.mlp], y_bf=0, out_bf=0, y_stride=n_fc1 + -n_fc1 % 16,
                           out_stride=h_fc2.shape[1], bias=_ptr(fc1[3]), out=_ptr(h_fc2), tmp=_ptr(self.act_tmp))
            keep += [attn, act]
            self._blocks.append((first, i > 0, h_qkv, p[0], attn, h_proj, p[1], norm2, h_fc1, p[2], act, h_fc2,
                                 p[3]))
        self.after = norm_args(*final, self.final, (f["mlp.fc2"][0], layers[-1][0]["mlp.fc2"][3]))
        self.logits = _aligned((R, V), np.float32)  # the head runs on the wanted rows only, moved to the first
        k = min(REFINE_TOP, V)
        self.idx = np.zeros(k, np.int32)
        self.xq_head, self.xs_head = _aligned((R * D,), np.uint8), _aligned((R * D // 32,), np.float32)
        self.vnni = _VnniArgs(n=1, N=V, K=D, qi=_ptr(qi), qsum=_ptr(qsum), scales=_ptr(self.scales),
                              bias=_ptr(self.head_bias), x=_ptr(self.final), out=_ptr(self.logits),
                              xq=_ptr(self.xq_head), xs=_ptr(self.xs_head))
        self.refine = _HeadArgs(n=1, N=V, K=D, k=k, y_stride=V, q=_ptr(self.emb), scales=_ptr(self.scales),
                                bias=_ptr(self.head_bias), x=_ptr(self.final), out=_ptr(self.logits),
                                idx=_ptr(self.idx))
        self._keep = (keep, layers, final, qi, qsum)
        self._rows = R
        self._calls = (lib.lmf_add_norm, lib.lmf_attention, lib.lmf_activation, lib.lmf_int4)

    @staticmethod
    def _float(wf: SafetensorsMap, name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = _aligned(shape, np.float32)
        a[:] = wf.get(name, "F32", shape)
        return a

    def _int4(self, wf: SafetensorsMap, name: str, n: int, Kp: int, symmetric: bool, bias: bool):
        """(levels, scales, zeros, bias, whether the scales and zeros are float16) of an int4 layer of n outputs and
        Kp (padded) inputs in lmf_int4's layout (native._int4_layout)."""
        G = self.group
        q = wf.get(f"{name}.qweight", "U8", (n, Kp // 2))
        s = wf.get(f"{name}.scales", "F32", (n, Kp // G))
        z = None if symmetric else wf.get(f"{name}.zeros", "F32", (n, Kp // G))
        Np = n + -n % 16
        lv = np.full((Np, Kp), 8, np.uint8)
        lv[:n, 0::2], lv[:n, 1::2] = q & 15, q >> 4
        lv = lv.reshape(Np // 16, 16, Kp // 32, 2, 4, 4)
        w = _aligned((Np // 16, Kp // 32, 4, 16, 4), np.uint8)
        w[:] = (lv[:, :, :, 0] | (lv[:, :, :, 1] << 4)).transpose(0, 2, 3, 1, 4)

        def tiled(t, dtype):
            out = _aligned((Np // 16, Kp // G, 16), dtype)
            full = np.zeros((Np, Kp // G), np.float32)
            full[:n] = t
            out[:] = full.reshape(Np // 16, 16, -1).transpose(0, 2, 1)
            return out
        # float16 where every scale and zero is one exactly (native._int4_layout)
        half = all(np.array_equal(t.astype(np.float16).astype(np.float32), t) for t in (s, z) if t is not None)
        dtype = np.float16 if half else np.float32
        b = None
        if bias:
            b = _aligned((Np,), np.float32)
            b[:n] = wf.get(f"{name}.bias", "F32", (n,))
        return w.reshape(Np // 16, Kp // 32, 256), tiled(s, dtype), None if z is None else tiled(z, dtype), b, half

    def _set_rows(self, n: int) -> None:
        if n == self._rows:
            return
        for blk in self._blocks:
            for a in blk:
                if isinstance(a, ctypes.Structure):
                    a.n = n
        self.after.n = n
        self._rows = n

    def run(self, tokens: list[int], pos, slots, want: list[int]) -> np.ndarray | None:
        """Run ``tokens`` (at most ``rows``), token r at position ``pos[r]`` of slot ``slots[r]`` (a prompt's tokens
        in order: each sees the ones before it); the logits (len(want), V) of the rows ``want``, float32 (a view,
        overwritten by the next call), or None when none is wanted."""
        n = len(tokens)
        self._set_rows(n)
        ids = np.asarray(tokens, np.int64)
        x = self.x[:n]
        np.multiply(self.emb[ids], self.scales[ids, None], out=x, casting="unsafe")
        if self.cfg.embedding_scale != 1.0:
            x *= np.float32(self.cfg.embedding_scale)
        self.pos[:n], self.slot[:n] = pos, slots
        self.top = max(self.top, int(self.pos[:n].max()) + 1)
        norm, attention, activation, int4 = self._calls
        out = self.out.ctypes.data
        for first, add, h_qkv, qkv, attn, h_proj, proj, norm2, h_fc1, fc1, act, h_fc2, fc2 in self._blocks:
            norm(ctypes.byref(first), out if add else None)  # the residual += the last product, then the norm
            qkv.x = h_qkv.ctypes.data
            int4(ctypes.byref(qkv))
            attention(ctypes.byref(attn), out)
            proj.x = h_proj.ctypes.data
            int4(ctypes.byref(proj))
            norm(ctypes.byref(norm2), out)
            fc1.x = h_fc1.ctypes.data
            int4(ctypes.byref(fc1))
            activation(ctypes.byref(act), out)
            fc2.x = h_fc2.ctypes.data
            int4(ctypes.byref(fc2))
        if not want:
            return None
        norm(ctypes.byref(self.after), out)
        m = len(want)
        if want != list(range(m)):  # the wanted rows' final norm outputs first, where the head reads
            self.final[:m] = self.final[want]
        self.vnni.n = self.refine.n = m
        self.lib.lmf_head_vnni(ctypes.byref(self.vnni))
        self.lib.lmf_head_refine(ctypes.byref(self.refine), None)
        return self.logits[:m]

    def step(self, tokens: list[int], last: bool = True) -> np.ndarray | None:
        """Run ``tokens`` (at most PREFILL_ROWS) at the next positions of the sequence in slot 0; the logits (V,) of
        the last one, float32 (a view, overwritten by the next step), or None when ``last`` is False."""
        n, p0 = len(tokens), self.length
        if p0 + n > self.max_len:
            raise LMForgeError(f"the sequence would pass {self.max_len} positions (the model's context or --max-len)")
        logits = self.run(tokens, np.arange(p0, p0 + n, dtype=np.int32), 0, [n - 1] if last else [])
        self.length = p0 + n
        return None if logits is None else logits[0]

    def forget(self) -> None:
        """Give the pages of the key/value cache back (its contents become zeros)."""
        for a in (self.k, self.v):
            while not isinstance(a, mmap.mmap):  # down the array's bases to the anonymous mapping
                a = a.obj if isinstance(a, memoryview) else a.base
            a.madvise(mmap.MADV_DONTNEED)
        self.top = 0

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Run a prompt; the logits after its last token."""
        if not tokens:
            raise LMForgeError("empty prompt")
        for i in range(0, len(tokens), PREFILL_ROWS):
            logits = self.step(tokens[i : i + PREFILL_ROWS], last=i + PREFILL_ROWS >= len(tokens))
        return logits

    def close(self) -> None:
        self.emb = None
        self._wmap.close()


class LeanRunner:
    """The runner of a ``LeanEngine`` (see ``lmforge.infer.batching.BatchEngine``): ``LeanModel``'s slots, each
    sequence's length kept here."""

    nv = 0  # no virtual tokens

    def __init__(self, model: LeanModel) -> None:
        self.model, self.max_len = model, model.max_len
        self.lens = [0] * model.slots
        cfg = model.cfg
        self._position_bytes = (2 * cfg.n_layer * cfg.kv_heads * cfg.head_size  # keys and values of a position
                                * model.kv_dtype.itemsize)

    def cache_bytes(self, slots: int, length: int) -> int:
        return slots * length * self._position_bytes

    def idle(self, positions: int) -> None:
        """Nothing runs: a cache that held far more positions than the next request needs gives its pages back."""
        if self.model.top >= 2 * max(positions, 32):  # (pages taken again cost a fault per 4 kB)
            self.model.forget()

    def prefill(self, slot: int, ids: list[int], every: bool = False) -> np.ndarray:
        """``ids`` into ``slot`` from position 0: the logits (V,) after the last (``every``: (len(ids), V))."""
        if not every:
            return self.prefill_many([slot], [ids])[0]
        m = self.model
        if not 1 <= len(ids) <= self.max_len:
            raise ValueError(f"prompts of 1 to {self.max_len} tokens only")
        out = np.empty((len(ids), m.cfg.vocab_size), np.float32)
        for a in range(0, len(ids), m.rows):
            b = min(a + m.rows, len(ids))
            out[a:b] = m.run(ids[a:b], np.arange(a, b, dtype=np.int32), np.full(b - a, slot, np.int32),
                             list(range(b - a)))
        self.lens[slot] = len(ids)
        return out

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> np.ndarray:
        """The prompts into their slots from position 0, their tokens packed into calls of up to ``rows`` rows;
        the logits (B, V) after each prompt."""
        m = self.model
        lens = np.array([len(p) for p in prompts])
        if lens.min() < 1 or lens.max() > self.max_len:
            raise ValueError(f"prompts of 1 to {self.max_len} tokens only")
        tokens = np.concatenate([np.asarray(p, np.int64) for p in prompts])
        pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
        slot = np.repeat(np.asarray(slots, np.int32), lens)
        last = np.cumsum(lens) - 1  # each prompt's last row
        out = np.empty((len(prompts), m.cfg.vocab_size), np.float32)
        for a in range(0, len(tokens), m.rows):
            b = min(a + m.rows, len(tokens))
            mine = np.flatnonzero((last >= a) & (last < b))  # prompts that end in this call
            logits = m.run(tokens[a:b], pos[a:b], slot[a:b], (last[mine] - a).tolist())
            if logits is not None:
                out[mine] = logits
        for s, n in zip(slots, lens):
            self.lens[s] = int(n)
        return out

    def decode(self, tokens: list[int | None]) -> np.ndarray:
        """One token for each slot given one (a view of the logits (k, V) of those slots, in slot order)."""
        slots = [i for i, t in enumerate(tokens) if t is not None]
        pos = [self.lens[i] for i in slots]
        if max(pos) >= self.max_len:
            raise ValueError(f"a sequence would pass {self.max_len} positions")
        logits = self.model.run([tokens[i] for i in slots], pos, slots, list(range(len(slots))))
        for i in slots:
            self.lens[i] += 1
        return logits


class LeanEngine(BatchEngine):
    """``BatchEngine`` over an int4 directory without PyTorch (``lmforge serve --runtime lean``): continuous batching
    of ``max_batch`` sequences through the C step, tokens selected by ``lean_sampling`` (NumPy)."""

    def __init__(self, path: str | Path, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 kv_budget: int | None = None, kv_dtype: str = "float16") -> None:
        self.model = LeanModel(path, max_len, slots=max_batch, kv_dtype=kv_dtype)
        super().__init__(LeanRunner(self.model), self.model.cfg.vocab_size, lean_sampling.select,
                         lean_sampling.LeanSampler, tokenizer, max_batch, kv_budget)


def _layer_widths(cfg: ModelConfig, group: int) -> dict[str, tuple[int, int, bool]]:
    """Each linear layer of a block: (outputs, inputs padded to the group size, has a bias)."""
    D, hd, nh, nkv, hidden = cfg.n_embd, cfg.head_size, cfg.n_head, cfg.kv_heads, cfg.hidden_size
    widths = {"attn.qkv": ((nh + 2 * nkv) * hd, D, cfg.qkv_bias), "attn.proj": (D, nh * hd, cfg.attn_out_bias),
              "mlp.fc1": ((2 if cfg.gated else 1) * hidden, D, cfg.mlp_bias), "mlp.fc2": (D, hidden, cfg.mlp_bias)}
    return {k: (n, K + -K % group, b) for k, (n, K, b) in widths.items()}


def _rotary(dim: int, n: int, theta: float, interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n, dim) float32, as ``lmforge.model.positions.Rotary`` makes them: the float32 exponents, theta to
    their power correctly rounded to float32 (PyTorch's float32 pow gives the same bits for the usual thetas; numpy's
    float32 pow did not), float32 angles, and their cos and sin rounded from float64."""
    e = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (np.float64(theta) ** e.astype(np.float64)).astype(np.float32)
    freqs = np.outer(np.arange(n, dtype=np.float32), inv_freq).astype(np.float32)
    emb = (np.repeat(freqs, 2, axis=-1) if interleaved else np.concatenate([freqs, freqs], axis=-1)).astype(np.float64)
    cos, sin = _aligned(emb.shape, np.float32), _aligned(emb.shape, np.float32)
    cos[:], sin[:] = np.cos(emb), np.sin(emb)
    return cos, sin


def generate(model: LeanModel, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None,
             stop_ids: list[int] | None = None) -> Iterator[int]:
    """Token ids after ``prompt`` until a stop id (not yielded), ``max_new_tokens`` or the end of the model's
    positions, as ``lmforge.infer.generate.stream`` yields them."""
    rng = np.random.default_rng(None if seed is None else seed % 2**64)  # (a negative int64 seed: as torch maps it)
    stops = set(stop_ids or [])
    n = min(max_new_tokens, model.max_len - model.length - len(prompt))
    if n <= 0:
        return
    logits = model.prefill(prompt)
    for i in range(n):
        t = lean_sampling.sample(logits, temperature, top_k, top_p, min_p, rng)
        if t in stops:
            return
        yield t
        if i < n - 1:
            logits = model.step([t])
