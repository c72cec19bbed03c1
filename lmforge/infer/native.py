"""The decoding step with its small operations in C: ``native.c``, compiled here on first use, loaded with ctypes.

A decoding step of SmolLM2-135M in int4 makes 121 packed-kernel calls and about 1,100 small tensor operations per
token (norms, rotary embedding, cache writes, attention over a few hundred keys, activations). Each small operation
costs PyTorch's dispatch and allocation, a few microseconds, whatever its size: half of the step. Here everything
between two matrix products is one C call over preallocated buffers: per layer four products and four calls. The
products are PyTorch's, or C where that is faster: float32 products of a few rows (``lmf_gemv``), int4 products with
integer dot products (``lmf_int4``, AVX512-VNNI), an int8 output projection of several rows (``lmf_head_vnni``). For
small models (float32 linear layers of ``SMALL_PRODUCTS`` weights at most, such as stories260K) the whole step is one
call that holds no interpreter lock between layers. Attention of many rows and the large C products share their
work among the calling thread's OpenMP threads: the library is built with ``-fopenmp`` and uses the libgomp PyTorch
loaded (one pool of threads; ``shares_torch_openmp``).

The library is built and loaded by ``lmforge.infer.clib`` (once per machine); where there is no compiler, or
``LMFORGE_NATIVE=0``, decoding keeps the PyTorch path (``SlotRunner._fast``), which computes the same numbers up to
float rounding.

``NativeStep.supported(model)`` says which models it covers: pre-norm blocks with RMSNorm or LayerNorm, rotary,
learned or no positions, a plain or gated MLP with SiLU, GELU or ReLU, and linear layers that are plain float32 or
lmforge's int8/int4 ``QuantLinear`` (LLaMA, Qwen, SmolLM2, GPT-2 style models; quantized or not).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer.clib import (
    ACTIVATION_CODES,
    _ActArgs,
    _AttnArgs,
    _FlashArgs,
    _GemvArgs,
    _HeadArgs,
    _Int4Args,
    _LinArgs,
    _NormArgs,
    _StepArgs,
    _VnniArgs,
    build,
    library,
    set_parallel,
)
from lmforge.infer.sampling import with_argmax
from lmforge.matmul import linear
from lmforge.memory import drop_file_pages, file_mappings, release_free_memory
from lmforge.model.attention import Attention
from lmforge.model.norms import RMSNorm
from lmforge.quant import QuantLinear
from lmforge.quant.packing import unpack_int4

SMALL_PRODUCTS = 1 << 20  # float32 weights (all linear layers) up to which the whole step is one C call
HEAD_ALL_ROWS = 64  # a prefill step of up to this many rows computes its int8 output projection for every row in
# C and keeps the rows wanted (through the module, its first call timed every kernel: 0.34 s and 75 MB at the peak)
VNNI_HEAD_ROWS = 1  # an int8 output projection of at least this many rows runs on int8 activations (lmf_head_vnni;
# one row too: SmolLM2 int4 169-173 -> 206-214 tokens/s on a Xeon with AMX, where the bfloat16 kernel was slower)
INT4_ROWS = 1  # int4 products of at least this many rows run on integer activations (lmf_int4, AVX512-VNNI)
GEMV_ROWS = 64  # float32 products of up to this many rows are lmf_gemv (SmolLM2: 1.06x MKL at 1 row, 1.7x at 16)
set_parallel()  # the library may have loaded before PyTorch did (lmforge generate asks the lean runtime first)


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Stale(Exception):
    """A layer's weight or compute mode changed since the step was planned."""


# ---- attention of whole sequences -------------------------------------------------------------------------

FLASH_MIN_ROWS = 16  # query rows from which lmf_flash takes a sequence's attention (decoding keeps SDPA)


def flash_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``flash_attention`` takes these float32 CPU tensors (see lmf_flash in native.c)."""
    lib = library()
    if lib is None or not lib.lmf_flash_ok(q.shape[-1]) or q.shape[2] < FLASH_MIN_ROWS:
        return False
    ts = (q, k, v) if mask is None else (q, k, v, mask)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in ts):
        return False
    if mask is not None and (mask.dim() != 4 or mask.shape[0] not in (1, q.shape[0])
                             or mask.shape[1] not in (1, q.shape[1]) or mask.shape[2:] != (q.shape[2], k.shape[2])):
        return False
    return k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0 and k.shape == v.shape


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                    scale: float | None) -> torch.Tensor | None:
    """softmax(q k^T scale + mask) v for q (B, H, T, D) and k, v (B, KV, S, D), key/value heads shared by H / KV
    query heads; a mask value <= -1e30 hides its key, ``causal`` (without a mask) hides key j from query t when
    j > t + S - T. Returns (B, T, H, D), the layout the output projection reads; None where ``flash_ok`` is not met
    (or the keys' scratch could not be allocated): the caller computes it otherwise."""
    if not flash_ok(q, k, v, mask):
        return None
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale  # SDPA's default
    out = torch.empty(B, T, H, D, dtype=torch.float32)
    if mask is not None:
        ms = [mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1) if mask.shape[1] > 1 else 0, mask.stride(2)]
    else:
        ms = [0, 0, 0]
    args = _FlashArgs(B, H, KV, T, S, D, int(bool(causal)), float(scale), *q.stride()[:3], *k.stride()[:3],
                      *v.stride()[:3], *ms, q.data_ptr(), k.data_ptr(), v.data_ptr(), _addr(mask), out.data_ptr())
    return out if library().lmf_flash(ctypes.byref(args)) else None


@contextlib.contextmanager
def flash_attention_in(model: nn.Module) -> Iterator[None]:
    """Within: ``model``'s attention layers run whole sequences (``FLASH_MIN_ROWS`` query rows or more, float32 on a
    CPU, without gradients) through ``flash_attention`` instead of PyTorch's SDPA: 2-3x faster here on SmolLM2's
    shapes (SDPA's CPU kernel makes its block products with MKL, slow on AMD processors; ``lmforge.matmul``)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if library() is None or not layers:
        yield
        return
    before = [m.kernel for m in layers]
    for m in layers:
        m.kernel = flash_attention
    try:
        yield
    finally:
        for m, k in zip(layers, before, strict=True):
            m.kernel = k


# ---- the linear layers -------------------------------------------------------------------------------


def _plain_linear(mod: nn.Module) -> bool:
    """A plain ``nn.Linear`` (no hooks) with float32 weight and bias on the CPU: what F.linear or a C product can
    compute in its place."""
    if type(mod) is not nn.Linear or mod._forward_hooks or mod._forward_pre_hooks:
        return False
    w, b = mod.weight, mod.bias
    return w.dtype == torch.float32 and w.device.type == "cpu" and (b is None or b.dtype == torch.float32)


def _signature(*tensors: torch.Tensor | None) -> list[tuple]:
    """(tensor, version, address) of each given tensor: a copy made of them is current while these are unchanged."""
    return [(t, t._version, t.data_ptr()) for t in tensors if t is not None]


def _unchanged(sig: list[tuple], *tensors: torch.Tensor | None) -> bool:
    """Whether ``tensors`` are those of ``sig``, not changed in place nor moved since."""
    now = [t for t in tensors if t is not None]
    return len(now) == len(sig) and all(
        t is s and t._version == v and t.data_ptr() == a for t, (s, v, a) in zip(now, sig))


def gemv(mod: nn.Linear, rows: int, fresh: bool = False):
    """A float32 ``nn.Linear`` as ``lmf_gemv`` for ``rows`` rows, reading its weight in place: fn(x (rows, K)) ->
    (rows, N), into one output buffer (a new one per call when ``fresh``). None where the kernel does not apply
    (no AVX512, K not a multiple of 16, a weight that is not contiguous). Stale once the weight is replaced."""
    lib, w, b = library(), mod.weight, mod.bias
    if lib is None or not w.is_contiguous() or not lib.lmf_gemv_ok(mod.in_features):
        return None
    b = None if b is None else b.detach().contiguous()
    N, ptr, params = mod.out_features, w.data_ptr(), mod._parameters
    out = torch.empty(rows, N)
    args = _GemvArgs(n=rows, K=mod.in_features, N=N, out_stride=N, w=ptr, bias=_addr(b), out=_addr(out))
    fn, at = lib.lmf_gemv, ctypes.addressof(args)

    def product(x: torch.Tensor) -> torch.Tensor:
        nonlocal out
        if params["weight"] is not w or w.data_ptr() != ptr:
            raise Stale
        if fresh:
            out = torch.empty(rows, N)
            args.out = out.data_ptr()
        args.x, args.x_stride = x.data_ptr(), x.stride(0)
        fn(at)
        return out
    product.keep = (w, b, args)
    return product


def _int4_layout(mod: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """``mod``'s int4 weight as lmf_int4 reads it (kept on the module while its weight is the same; the same size as
    the weight): levels (N / 16, K / 32, 4, 64) bytes, byte 4 c + j of row m of a block holding output 16 t + c's
    inputs 4 m + j (low 4 bits) and 16 + 4 m + j (high 4 bits); scales and zeros (N / 16, K / G, 16), float16 where
    every value is one exactly (a GGUF's Q4_1 weights: half the bytes a token reads for them, the same products) and
    float32 otherwise; and whether they are float16."""
    q, s, z = mod.qweight, mod.scales, mod.zeros
    cached = mod.__dict__.get("_lmforge_int4")
    if cached is not None and _unchanged(cached[0], q, s, z):
        return cached[1]
    with torch.no_grad(), torch.inference_mode(False):
        N, K = q.shape[0], q.shape[1] * 2
        Np = N + -N % 16
        lv = unpack_int4(q)
        if Np != N:
            lv = F.pad(lv, (0, 0, 0, Np - N), value=8)
        lv = lv.view(Np // 16, 16, K // 32, 2, 4, 4)  # (tile, output, block, half, m, j)
        w = (lv[:, :, :, 0] | (lv[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).contiguous()  # (tile, block, m, c, j)

        def tiled(t: torch.Tensor) -> torch.Tensor:
            t = F.pad(t.float(), (0, 0, 0, Np - N)) if Np != N else t.float()
            return t.view(Np // 16, 16, -1).transpose(1, 2).contiguous()
        st, zt = tiled(s), None if z is None else tiled(z)
        sh, zh = st.half(), None if zt is None else zt.half()
        half = torch.equal(sh.float(), st) and (zt is None or torch.equal(zh.float(), zt))
        layout = (w.view(Np // 16, K // 32, 256), *((sh, zh) if half else (st, zt)), half)
        del lv, w
    mod.__dict__["_lmforge_int4"] = (_signature(q, s, z), layout)
    release_free_memory()  # the temporaries (the unpacked levels: twice the weight)
    drop_loaded_pages(q, s, z)
    return layout


def drop_loaded_pages(*tensors: torch.Tensor | None) -> None:
    """Give back the resident pages of tensors still on the mapping of the file they were loaded from and unchanged
    since (``lmforge.quant.io`` maps a quantized directory's weights): their contents were just copied into a kernel
    layout, and what reads them again (an embedding row, a product another path computes) maps them again from the
    file. A tensor written since it was loaded (its version counter moved) keeps its pages: they hold its changes."""
    mapped = None
    for t in tensors:
        if t is None or t.device.type != "cpu" or t.is_inference():
            continue
        if t._version:
            continue
        if mapped is None:
            mapped = file_mappings()
        drop_file_pages(t.data_ptr(), t.numel() * t.element_size(), mapped)


def int4_ok(mod: nn.Module) -> bool:
    """Whether ``mod`` is an int4 ``QuantLinear`` (auto compute mode, groups of a multiple of 32, on the CPU) that
    ``lmf_int4`` computes here (AVX512-VNNI)."""
    if type(mod) is not QuantLinear or mod.bits != 4 or mod.compute != "auto" or mod.group_size % 32:
        return False
    lib = library()
    return (lib is not None and bool(lib.lmf_vnni_ok()) and mod.qweight.device.type == "cpu"
            and not mod._forward_hooks and not mod._forward_pre_hooks)


def int4(mod: QuantLinear, rows: int, buffers: tuple[torch.Tensor, ...] | None = None):
    """An int4 ``QuantLinear`` as ``lmf_int4`` (activations as two int8 parts, AVX512-VNNI) for ``rows`` rows:
    fn(x (rows, padded K) float32) -> (rows, >= N) float32 without the bias, into one output buffer. ``buffers``:
    (output, int8 scratch, float scratch) flat tensors of at least rows x N, 2 rows x K and 3 rows x K / 32 elements,
    which products run one after another may share (a step's products: each output is read before the next one).
    None where the kernel does not apply (see ``int4_ok``). Each row's result is the same whatever the row count (a
    prefill through the C step computes what decoding computes)."""
    if not int4_ok(mod):
        return None
    lib = library()
    w, s, z, half = _int4_layout(mod)
    N, K = w.shape[0] * 16, w.shape[1] * 32
    if buffers is None:
        buffers = int4_buffers(rows, N, K)
    out, xq, xs = buffers[0][: rows * N].view(rows, N), buffers[1], buffers[2]
    if xq.numel() < 2 * rows * K or xs.numel() < rows * K // 32 * 3:
        raise ValueError("int4 scratch buffers too small")
    args = _Int4Args(n=rows, N=N, K=K, G=mod.group_size, x_stride=K, out_stride=N, w=w.data_ptr(), scales=s.data_ptr(),
                     zeros=_addr(z), out=out.data_ptr(), xq=xq.data_ptr(), xs=xs.data_ptr(), half=int(half))
    at, fn, decode = ctypes.addressof(args), lib.lmf_int4, mod._decode

    def product(x: torch.Tensor) -> torch.Tensor:
        if mod._decode is not decode:  # a new weight or compute mode empties it
            raise Stale
        args.x, args.x_stride = x.data_ptr(), x.stride(0)
        fn(at)
        return out
    product.keep = (args, w, s, z, buffers)  # what the C side points into
    return product


def int4_buffers(rows: int, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``int4``'s buffers for products of up to N outputs and K (padded) inputs."""
    N, K = N + -N % 16, K + -K % 32
    return torch.empty(rows * N), torch.empty(2 * rows * K, dtype=torch.int8), torch.empty(rows * K // 32 * 3)


def _product(mod: nn.Module, rows: int, buffers: tuple[torch.Tensor, ...] | None = None):
    """(fn, input dtype, padded K, bias for C or None) computing ``mod`` on a (rows, padded K) buffer; fn returns
    (rows, >= N) in float32 or bfloat16, rows contiguous. None for a layer this step does not cover."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        return None
    if type(mod) is nn.Linear:
        if not _plain_linear(mod):
            return None
        w, b = mod.weight, mod.bias
        if rows <= GEMV_ROWS:
            fn = gemv(mod, rows)
            if fn is not None:
                return fn, torch.float32, mod.in_features, None
        return (lambda x: linear(x, w, b)), torch.float32, mod.in_features, None
    if type(mod) is not QuantLinear or mod.compute not in ("auto", "float32", "bfloat16"):
        return None
    if mod.qweight.device.type != "cpu":
        return None
    if rows >= INT4_ROWS:
        fn = int4(mod, rows, buffers)
        if fn is not None:
            return fn, torch.float32, mod.qweight.shape[1] * 2, mod.bias
    mode, decode = mod._mode(torch.empty(rows, mod.in_features)), mod._decode
    if mode == "dequant":
        def deq(x):
            if mod._decode is not decode:
                raise Stale
            return mod._forward(x, "dequant")  # bias included
        return deq, torch.float32, mod.in_features, None
    kernel, dt, kp = mod.kernel(mode)

    def packed(x):
        if mod._decode is not decode:  # a new weight or compute mode empties it
            raise Stale
        return kernel(x)
    return packed, dt, kp, mod.bias


# ---- the step ----------------------------------------------------------------------------------------


def _norm_kind(norm: nn.Module | None) -> tuple[int, torch.Tensor | None, torch.Tensor | None, float] | None:
    if norm is None:
        return 0, None, None, 0.0
    if type(norm) is RMSNorm and norm.weight.dtype == torch.float32:
        return 1, norm.weight, None, norm.eps
    if type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1 and (
            norm.weight is None or norm.weight.dtype == torch.float32):
        return 2, norm.weight, norm.bias, norm.eps
    return None


class NativeStep:
    """The decoding step of ``SlotRunner`` for ``n`` rows with the small operations in C (see the module doc).

    ``run(x0, lens)`` takes the embedded tokens and each row's position, writes each row's new key/value into the
    runner's cache there and returns the logits (n, V); row r is slot r."""

    @staticmethod
    def supported(model: nn.Module, runner) -> bool:
        cfg = model.cfg
        if library() is None or runner.device.type != "cpu" or runner.dtype != torch.float32 or runner.nv:
            return False
        if cfg.position not in ("rope", "learned", "none") or any(runner.local) or cfg.norm_placement != "pre":
            return False
        if cfg.parallel_block or cfg.mlp not in ACTIVATION_CODES or cfg.n_head % cfg.kv_heads:
            return False
        if cfg.position == "rope" and (model.rotary.cos.dtype != torch.float32 or cfg.rotary_dim % 2):
            return False
        if model.training or (cfg.final_norm and _norm_kind(model.norm_f) is None):
            return False
        for b in model.blocks:
            if b.adapter_attn is not None or b.adapter_mlp is not None or b.placement != "pre" or b.parallel:
                return False
            if _norm_kind(b.norm1) is None or _norm_kind(b.norm2) is None:
                return False
        return True

    def __init__(self, runner, n: int) -> None:
        self.lib = library()
        self.runner, self.n = runner, n
        m, cfg = runner.model, runner.cfg
        self.model, self.cfg = m, cfg
        D = cfg.n_embd
        self.pos = torch.zeros(n, dtype=torch.int32)
        self._pos_np = self.pos.numpy()
        self.slot = torch.arange(n, dtype=torch.int32)  # row r -> its cache slot (r, unless run is given slots)
        self._slot_np, self._identity = self.slot.numpy(), True
        self.x = torch.zeros(n, D)
        self._ids = (ctypes.c_int64 * n)()  # the rows' token ids, for a gather from a float32 table (run)
        self._table: np.ndarray | None = None
        self._table_at = 0
        self.final = torch.zeros(n, D)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._keep: list = []  # argument blocks and tensors the C side points into
        self.rotary = (m.rotary.cos, m.rotary.sin) if cfg.position == "rope" else None
        self.layers = []
        norms = [_norm_kind(b.norm1) for b in m.blocks] + [_norm_kind(m.norm_f if cfg.final_norm else None)]
        prods = []
        self._weights: list | None = [] if self._small() else None  # what the C products copied, to check
        lin = [mod for blk in m.blocks for mod in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)]
        i4 = [mod for mod in lin if int4_ok(mod)]
        shared = int4_buffers(n, max(mod.out_features for mod in i4), max(mod.qweight.shape[1] * 2 for mod in i4)) \
            if i4 else None  # the int4 products' output and scratch, one after another
        product = self._c_linear if self._weights is not None else (lambda mod: _product(mod, n, shared))
        for blk in m.blocks:
            p = [product(mod) for mod in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)]
            if any(x is None for x in p):
                raise ValueError("a layer this step does not cover")
            prods.append(p)
        # the first norm reads the embedded tokens already in x
        self.first = self._norm_args(norms[0], prods[0][0], None)
        args: list[tuple] = []
        for i, blk in enumerate(m.blocks):
            qkv, proj, fc1, fc2 = prods[i]
            a = blk.attn
            attn_in = self._buffer(qkv)
            ha = self._buffer(proj, a.n_head * a.hd)
            y_qkv = self._probe(qkv, attn_in)
            attn = _AttnArgs(
                n=n, nh=a.n_head, nkv=a.n_kv, hd=a.hd, rd=cfg.rotary_dim if self.rotary else 0,
                interleaved=int(cfg.rope_interleaved), max_len=runner.cap,
                y_bf=int(y_qkv.dtype == torch.bfloat16), out_bf=int(proj[1] == torch.bfloat16),
                y_stride=y_qkv.stride(0), out_stride=ha.stride(0),
                scale=a.scale if a.scale is not None else a.hd ** -0.5, pos=_addr(self.pos), slot=_addr(self.slot),
                cos=_addr(self.rotary[0]) if self.rotary else None, sin=_addr(self.rotary[1]) if self.rotary else None,
                bias=_addr(self._keep_t(qkv[3])), k=_addr(runner.k[i]), v=_addr(runner.v[i]), out=_addr(ha),
                kvb=_addr(runner.kv_blocks[i]) if runner.kv_blocks is not None else None,
                kvb_len=_addr(runner.kv_blocks_len[i]) if runner.kv_blocks is not None else None,
                kvb_slots=runner.slots,
                tmp=_addr(self._keep_t(torch.zeros((a.n_head + 2 * a.n_kv) * a.hd
                                                    + a.n_head // a.n_kv * (runner.cap + a.hd)))))
            y_proj = self._probe(proj, ha)
            norm2 = self._norm_args(_norm_kind(blk.norm2), fc1, (proj, y_proj))
            hidden = fc2_k = blk.mlp.fc2.in_features
            f_in = self._buffer(fc2, hidden)
            y_fc1 = self._probe(fc1, self._buffer(fc1))
            act = _ActArgs(n=n, f=hidden, gated=int(blk.mlp.gated), act=ACTIVATION_CODES[cfg.mlp],
                           y_bf=int(y_fc1.dtype == torch.bfloat16), out_bf=int(fc2[1] == torch.bfloat16),
                           y_stride=y_fc1.stride(0), out_stride=f_in.stride(0), bias=_addr(self._keep_t(fc1[3])),
                           out=_addr(f_in), tmp=_addr(self._keep_t(torch.zeros(2 * fc2_k))))
            y_fc2 = self._probe(fc2, f_in)
            nxt = prods[i + 1][0] if i + 1 < len(m.blocks) else None
            after = self._norm_args(norms[i + 1], nxt, (fc2, y_fc2))
            self._keep += [attn, norm2, act, after]
            args.append((attn, norm2, act, after))
            self.layers.append((qkv[0], ctypes.addressof(attn), attn_in, proj[0], ctypes.addressof(norm2), ha,
                                fc1[0], ctypes.addressof(act), self._buffer(fc1), fc2[0], ctypes.addressof(after),
                                f_in))
        self._head = None  # the output projection of every row, made at its first use (a prefill's step of many
        # rows does not use it: its last rows go through the model's own layer)
        self.head_in_c = self._refined_head_applies()
        self._step: _StepArgs | None = None
        self._started: torch.Tensor | None = None  # the logits of a step begun by start
        self.seconds = 0.0  # the last begun step's time under way (finish)
        self.whole = False  # the whole step is one C call (lmf_step)
        # every product a C kernel, no PyTorch product between the C calls: the PyTorch step, which pays per layer
        # what the C calls save, is no rival
        self.c_products = self._weights is not None or (n >= INT4_ROWS and len(i4) == len(lin))
        if self._weights is not None:
            head = self._c_linear(m.lm_head)
            head[0](self.final)  # its input is the final norm's output
            self._head_args, V = head[0].args, m.lm_head.out_features
            self._head_shape = (n, self._head_args.Np)
            arrays = [(ctypes.c_void_p * len(a))(*(ctypes.addressof(x) for x in a)) for a in (
                [p[0].args for layer in prods for p in layer], *zip(*args))]
            self._top = (ctypes.c_int64 * n)()  # each row's argmax, found by the step (its logits hot)
            self._step = _StepArgs(n_layer=len(m.blocks), first=ctypes.addressof(self.first),
                                   lin=ctypes.addressof(arrays[0]), attn=ctypes.addressof(arrays[1]),
                                   norm2=ctypes.addressof(arrays[2]), act=ctypes.addressof(arrays[3]),
                                   after=ctypes.addressof(arrays[4]), head=ctypes.addressof(self._head_args),
                                   top=ctypes.addressof(self._top))
            self._keep += [arrays, self._step]
            self._step_at, self._vocab, self.whole = ctypes.addressof(self._step), V, True

    def _gemv_head(self):
        """A float32 output projection as ``lmf_gemv`` (a new output per step) for a few rows, else None."""
        mod = self.model.lm_head
        return gemv(mod, self.n, fresh=True) if self.n <= GEMV_ROWS and _plain_linear(mod) else None

    def _small(self) -> bool:
        """Whether every product (and the output projection) is a plain float32 ``nn.Linear`` on the CPU, their
        weights SMALL_PRODUCTS floats at most in all, and the C products are vectorized here: then the products are
        ``lmf_linear`` and the whole step is one call (``lmf_step``)."""
        m = self.model
        mods = [mod for b in m.blocks for mod in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)] + [m.lm_head]
        for mod in mods:
            if not _plain_linear(mod):
                return False
            try:  # inference tensors have no version counter (their changes could not be seen)
                _signature(mod.weight, mod.bias)
            except RuntimeError:
                return False
        return sum(mod.weight.numel() for mod in mods) <= SMALL_PRODUCTS and bool(self.lib.lmf_linear_fast())

    def _transposed(self, mod: nn.Linear, Np: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight transposed to (K, Np) and the bias padded to Np, shared by the runner's steps (one per row
        count) while the module's weight and bias are the same tensors, unchanged."""
        cache = self.runner.transposed
        hit = cache.get(id(mod))
        if hit is not None and _unchanged(hit[0], mod.weight, mod.bias):
            return hit[1], hit[2]
        wt = torch.zeros(mod.in_features, Np)
        wt[:, : mod.out_features] = mod.weight.detach().t()
        bias = None
        if mod.bias is not None:
            bias = torch.zeros(Np)
            bias[: mod.out_features] = mod.bias.detach()
        cache[id(mod)] = (_signature(mod.weight, mod.bias), wt, bias)
        return wt, bias

    def _c_linear(self, mod: nn.Linear):
        """``mod`` as an ``lmf_linear`` product: (fn, float32, K, None); fn(x) writes (n, N) into its own output
        buffer (row stride: N padded to 16) and returns a view of it. The weight is kept transposed (and the bias
        padded): ``run`` plans again (Stale) once either changes in place or is replaced."""
        K, N = mod.in_features, mod.out_features
        Np = -(-N // 16) * 16
        wt, bias = self._transposed(mod, Np)
        out = torch.zeros(self.n, Np)
        args = _LinArgs(n=self.n, K=K, N=N, Np=Np, x_stride=K, wt=_addr(self._keep_t(wt)),
                        bias=_addr(self._keep_t(bias)), out=_addr(out))
        self._keep += [args, out]
        params = mod._parameters  # flat (dict, name, tensor, version, address) rows: run checks them every step
        sigs = _signature(mod.weight, mod.bias)
        self._weights += [(params, name, *sig) for name, sig in zip(("weight", "bias"), sigs)]
        fn, at, view = self.lib.lmf_linear, ctypes.addressof(args), out[:, :N]

        def linear(x: torch.Tensor) -> torch.Tensor:
            args.x, args.x_stride = x.data_ptr(), x.stride(0)
            fn(at)
            return view
        linear.args = args
        return linear, torch.float32, K, None

    def _refined_head_applies(self) -> bool:
        """Whether ``_refined_head`` may apply (the checks that need no kernel built)."""
        mod = self.model.lm_head
        return (type(mod) is QuantLinear and mod.bits == 8 and bool(mod.refine_top) and mod.compute in
                ("auto", "bfloat16") and not mod._forward_hooks and not mod._forward_pre_hooks
                and mod.qweight.device.type == "cpu")

    def _refined_head(self):
        """An int8 output projection (``QuantLinear.refine_top`` set) that recomputes its top candidates exactly in C
        after lmf_head_vnni (int8 activations, AVX512-VNNI) or, without it, after the bfloat16 kernel as QuantLinear
        calls it: the conversion, bias and recomputation in one C call (PyTorch's topk alone took 100 us of 49,152
        logits). None for any other output projection (it keeps ``SlotRunner._head_fn``)."""
        mod, n = self.model.lm_head, self.n
        if not self._refined_head_applies():
            return None
        k, N = min(mod.refine_top, mod.out_features), mod.out_features
        args = _HeadArgs(n=n, N=N, K=mod.in_features, k=k, y_stride=N, q=_addr(self._keep_t(mod.qweight)),
                         scales=_addr(self._keep_t(mod.scales.float())), bias=_addr(self._keep_t(mod.bias)),
                         x=_addr(self.final), idx=_addr(self._keep_t(torch.zeros(k, dtype=torch.int32))))
        self._keep.append(args)
        # int8 activations (AVX512-VNNI) whatever the module's own fastest mode for this many rows is: at 16 rows
        # that was "dequant" (a float32 product over a dequantized weight, 10.6 ms for SmolLM2) against 3 ms here
        vnni = self._vnni_head(mod, args)
        mm = None
        if vnni is None:
            if mod._mode(torch.empty(n, mod.in_features)) != "bfloat16":
                return None
            mm = mod._packed_mm("bfloat16")
            y = mm(self.final)
            if y.dtype != torch.bfloat16 or y.stride(1) != 1 or y.shape != (n, N):
                return None
            args.y_stride = y.stride(0)
        decode = mod._decode
        fn, at, shape = self.lib.lmf_head_refine, ctypes.addressof(args), (n, N)
        vfn, vargs = vnni if vnni is not None else (None, None)
        vat = ctypes.addressof(vargs) if vargs is not None else None

        def head(x: torch.Tensor) -> torch.Tensor:
            if mod._decode is not decode:
                raise Stale
            out = torch.empty(shape)  # a new tensor per step: callers may keep the logits
            args.x, args.out = x.data_ptr(), out.data_ptr()
            if vfn is None:
                y = mm(x)
                fn(at, y.data_ptr())
            else:  # its logits go straight into out
                vargs.x, vargs.out = args.x, args.out
                vfn(vat)
                fn(at, None)
            return out
        return head

    def _vnni_head(self, mod: QuantLinear, args: _HeadArgs):
        """For VNNI_HEAD_ROWS rows or more on an AVX512-VNNI CPU: (lmf_head_vnni, its arguments), the weight
        interleaved once per module (kept on it while its int8 weight is the same: 28 MB for SmolLM2). None
        otherwise (the bfloat16 kernel stays)."""
        n, N, K = self.n, mod.out_features, mod.in_features
        q = mod.qweight
        if n < VNNI_HEAD_ROWS or not self.lib.lmf_vnni_ok() or N % 16 or K % 32 or q.dtype != torch.int8:
            return None
        if q.shape != (N, K) or not q.is_contiguous():
            return None
        cached = mod.__dict__.get("_lmforge_vnni")
        if cached is None or cached[0] is not q or cached[1] != q.data_ptr():
            with torch.inference_mode(False):
                qi = q.detach().view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous()
                # (a sum over the whole weight at once made an int32 copy of it: 113 MB more at the peak for SmolLM2)
                groups = torch.cat([c.sum(-1, dtype=torch.int32) * 128
                                    for c in q.detach().view(N // 16, 16, K // 32, 32).split(256)])
                qsum = groups.permute(0, 2, 1).contiguous()  # (N / 16, K / 32, 16)
            cached = mod.__dict__["_lmforge_vnni"] = (q, q.data_ptr(), qi, qsum)
            drop_loaded_pages(q)  # an embedding's table: a token maps its one row again
        _, _, qi, qsum = cached
        vargs = _VnniArgs(n=n, N=N, K=K, qi=_addr(self._keep_t(qi)), qsum=_addr(self._keep_t(qsum)),
                          scales=args.scales, bias=args.bias,
                          xq=_addr(self._keep_t(torch.zeros(n * K, dtype=torch.uint8))),
                          xs=_addr(self._keep_t(torch.zeros(n * K // 32))))
        self._keep.append(vargs)
        return self.lib.lmf_head_vnni, vargs

    def _keep_t(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is not None:
            t = t.detach().contiguous()
            self._keep.append(t)
        return t

    def _buffer(self, prod, width: int | None = None) -> torch.Tensor:
        """The input buffer of a product whose input is ``width`` (default n_embd) columns wide, shared by the products
        of the same width, padded width and dtype (each is read by its product before the next one is written). Only
        the first ``width`` columns are ever written, so the padding columns stay zero (asymmetric int4 products
        multiply them by zero points)."""
        key = (prod[1], prod[2], width or self.cfg.n_embd)
        if key not in self._buffers:
            self._buffers[key] = torch.zeros(self.n, prod[2], dtype=prod[1])
        return self._buffers[key]

    def _probe(self, prod, buf: torch.Tensor) -> torch.Tensor:
        """One call of the product: its output's dtype and row stride (and the kernel layouts built)."""
        y = prod[0](buf)
        if y.dim() != 2 or y.stride(1) != 1 or y.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("unexpected product output")
        return y

    def _norm_args(self, norm, prod, added) -> _NormArgs:
        """x (+= the output of ``added`` = (prod, probe output)), then the norm into the input buffer of ``prod``
        (or into ``final`` when prod is None: the output projection's input, float32)."""
        kind, w, b, eps = norm
        out = self._buffer(prod) if prod is not None else self.final
        y_bf = y_stride = 0
        y_bias = None
        if added is not None:
            y_bf, y_stride, y_bias = int(added[1].dtype == torch.bfloat16), added[1].stride(0), added[0][3]
        args = _NormArgs(n=self.n, d=self.cfg.n_embd, kind=kind, y_bf=y_bf, out_bf=int(out.dtype == torch.bfloat16),
                         y_stride=y_stride, out_stride=out.stride(0), eps=eps, x=_addr(self.x),
                         y_bias=_addr(self._keep_t(y_bias)), w=_addr(self._keep_t(w)), b=_addr(self._keep_t(b)),
                         out=_addr(out), tmp=_addr(self._keep_t(torch.zeros(self.cfg.n_embd))))
        self._keep.append(args)
        return args

    def current(self) -> bool:
        """Whether the tensors this step points into are still the model's (rotary tables grow lazily)."""
        return self.rotary is None or (self.model.rotary.cos is self.rotary[0])

    def _inputs(self, x0: torch.Tensor | tuple[np.ndarray, list[int]], lens: list[int],
                slots: list[int] | None) -> None:
        """The step's inputs in place: positions, slots, the embedded rows (see ``run``)."""
        if slots is not None:
            self._slot_np[:] = slots
            self._identity = False
        elif not self._identity:
            self._slot_np[:] = range(self.n)
            self._identity = True
        self._pos_np[:] = lens
        if isinstance(x0, torch.Tensor):
            self.x.copy_(x0)
            return
        table, ids = x0  # gathered in C with the interpreter lock kept (NumPy's gather let it go, and waited for it)
        if table is not self._table:  # (0: a tied table laid out column-major for the output projection's sake)
            self._table, self._table_at = table, table.ctypes.data if table.flags.c_contiguous else 0
        if not self._table_at:
            self.x.numpy()[:] = table[ids]
        else:
            self._ids[: len(ids)] = ids
            bad = self.lib.held.lmf_gather_rows(self._table_at, table.shape[0], table.shape[1], self._ids, len(ids),
                                                self.x.data_ptr())
            if bad:
                raise IndexError(f"token id {ids[bad - 1]} is outside the embedding table of {table.shape[0]} rows")

    def _check_weights(self) -> None:
        """Stale unless the weights are the ones the C products copied."""
        for params, name, t, version, ptr in self._weights:  # as _unchanged, inlined: a loop per step
            if params[name] is not t or t._version != version or t.data_ptr() != ptr:
                raise Stale

    def _logits_out(self, checked: bool = True) -> torch.Tensor:
        """A whole step's logits buffer, after checking its weights are the ones it copied (Stale otherwise; not
        ``checked``: the caller checks)."""
        if checked:
            self._check_weights()
        # a new tensor per step (callers may keep the logits), allocated by NumPy: torch.empty lets the interpreter
        # lock go, and under 16 streams the engine's thread then waited for the HTTP thread (12 % of its time)
        logits = torch.from_numpy(np.empty(self._head_shape, np.float32))
        self._head_args.out, self._logits = logits.data_ptr(), logits  # (never a freed address in the args)
        return logits

    def _trimmed(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, : self._vocab].contiguous() if self._vocab != logits.shape[1] else logits

    def start(self, x0: torch.Tensor | tuple[np.ndarray, list[int]], lens: list[int],
              slots: list[int] | None = None) -> bool:
        """``run(x0, lens, slots)`` of a whole decoding step (``whole``; its rows in distinct slots), begun on the
        library's background thread (``lmf_step_start``), which takes its rows four at a time; ``finish`` computes
        the rows not yet taken, waits for the others and gives the logits. Until then nothing may touch this step's
        buffers or the runner's cache. False: nothing begun (not a whole step, or no background thread)."""
        if self._step is None:
            return False
        self._inputs(x0, lens, slots)
        logits = self._logits_out(checked=False)
        if self.lib.held.lmf_step_start(self._step_at):
            return False
        try:  # the weights checked while the step runs (Stale: it ends first; it wrote only positions a redone step
            self._check_weights()  # writes again)
        except Stale:
            self.lib.lmf_step_join()
            raise
        self._started = logits
        return True

    def finish(self) -> torch.Tensor:
        """The logits (n, V) of the step ``start`` began, once it has ended (its rows not yet taken computed here);
        ``seconds``: from its start to the end of its computation."""
        self.lib.lmf_step_join()
        self.seconds = self.lib.held.lmf_step_seconds()  # (holding the interpreter lock: no wait to take it back)
        logits, self._started = self._started, None
        return with_argmax(self._trimmed(logits), self._top[:])

    def run(self, x0: torch.Tensor | tuple[np.ndarray, list[int]], lens: list[int], slots: list[int] | None = None,
            last: list[int] | None = None) -> torch.Tensor:
        """x0 (n, D): the embedded tokens, or (a float32 embedding table as numpy, the n token ids) whose rows are
        gathered here; lens: each row's position (< 0: a padding row, left out). Logits (n, V); with ``slots`` (each
        row's cache slot; default row r is slot r) and ``last`` (the rows wanted), the logits of the ``last`` rows
        only, by the model's output layer (a prefill: the rows of a prompt in order)."""
        self._inputs(x0, lens, slots)
        lib = self.lib
        if self._step is not None:
            logits = self._logits_out()
            lib.lmf_step(self._step_at)
            logits = self._trimmed(logits)
            return with_argmax(logits, self._top[:]) if last is None else logits[last]
        norm, attention, activation = lib.lmf_add_norm, lib.lmf_attention, lib.lmf_activation
        norm(ctypes.addressof(self.first), None)
        for qkv, attn, h, proj, norm2, a, fc1, act, h2, fc2, after, f in self.layers:
            y = qkv(h)  # held in a name: a temporary would be freed before the C call reads it
            attention(attn, y.data_ptr())
            y = proj(a)
            norm(norm2, y.data_ptr())
            y = fc1(h2)
            activation(act, y.data_ptr())
            y = fc2(f)
            norm(after, y.data_ptr())
        if last is not None:
            if self.n <= HEAD_ALL_ROWS and self.head_in_c:  # every row in C, then the wanted ones
                head = self.head  # (made now: it may turn out not to be C after all)
                if self.head_in_c:
                    return head(self.final)[last]
            return self.model.lm_head(self.final[last])
        return self.head(self.final)

    @property
    def head(self):
        """The output projection of every row (see run)."""
        if self._head is None:
            refined = self._refined_head()
            self.head_in_c = refined is not None
            self._head = refined or self._gemv_head() or self.runner._head_fn()
        return self._head


__all__ = ["NativeStep", "Stale", "build", "library"]
