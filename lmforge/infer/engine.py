"""Batched decoding with a slot cache, and continuous batching for the server.

``SlotRunner`` owns a key/value cache of ``n_slots`` rows, each holding one sequence at its own length. A prompt is
prefilled alone into its slot (through ``Decoder.forward``); then one batched forward decodes a token for every
active slot, each at its own position, with attention limited to that slot's valid length.

At small sizes a decode step costs what its Python-issued operations cost, so the step for every architecture but
GLM's 2D positions is a lean path over the decoder's own weights and modules: per-step work is hoisted out of the
layer loop (one additive mask, one rotary matrix per position, one cache index), rotary embedding is a single
batched matmul, keys/values are written with ``index_copy_``, attention is baddbmm/softmax/bmm with grouped-query
heads folded into the batch, residual adds ride on ``addmm``, and for small float32 RMSNorm models the residual
stream is kept as ``[x, -x]`` so each RMSNorm is one LayerNorm call. GLM models (and models in training mode) decode
through ``Decoder.forward`` with per-row positions and a key mask.

``Engine`` is ``lmforge.infer.batching.BatchEngine`` (continuous batching: the scheduling, without PyTorch) over a
``SlotRunner``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.infer.batching import BatchEngine, EngineError, Request
from lmforge.infer.native import FLASH_MIN_ROWS, NativeStep, Stale, flash_attention_in, int4_ok, library
from lmforge.infer.sampling import TokenSampler, select, take_rows
from lmforge.matmul import linear
from lmforge.memory import drop_file_pages, file_mappings, release_free_memory
from lmforge.model import Decoder
from lmforge.model.cache import kv_cache_len
from lmforge.quant import QuantEmbedding, QuantLinear

NATIVE_TRIALS = 3  # timed steps of each plan before a row count keeps the fastest (see SlotRunner._plan_for)
Plan = tuple[bool, int]  # how a decode step runs: (the C-assisted step, torch threads)
NATIVE_PREFILL_ROWS = 256  # prompts of up to this many tokens in all are prefilled by the C step
MIN_CACHE_LEN = 256  # positions the key/value cache starts with (it doubles from there as prompts and steps need)
PAIR_THREADS = 2  # an Engine of this many threads decodes one-call steps on a pair of threads (SlotRunner.pair_threads)


class _SlotView:
    """A KVCache stand-in for ``Decoder.forward`` that reads and writes one slot of a ``SlotRunner``."""

    def __init__(self, runner: SlotRunner, slot: int) -> None:
        self.r, self.slot, self.pos = runner, slot, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        if end > self.r.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.r.max_len}")
        s = self.slot
        self.r.reserve(s + 1, end)
        self.r.rewritten([s], self.pos)
        self.r.k[layer, s : s + 1, :, self.pos : end] = k
        self.r.v[layer, s : s + 1, :, self.pos : end] = v
        return self.r.k[layer, s : s + 1, :, :end], self.r.v[layer, s : s + 1, :, :end]


class _SlotsView:
    """A KVCache stand-in for ``Decoder.forward`` prefilling several slots at once from position 0."""

    def __init__(self, runner: SlotRunner, slots: torch.Tensor) -> None:
        self.r, self.slots, self.pos = runner, slots, 0
        self.top = int(slots.max()) + 1  # slots the cache must hold

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        self.r.reserve(self.top, end)
        self.r.rewritten(self.slots, self.pos)
        self.r.k[layer][self.slots, :, self.pos : end] = k
        self.r.v[layer][self.slots, :, self.pos : end] = v
        return self.r.k[layer][self.slots, :, :end], self.r.v[layer][self.slots, :, :end]


class _RowsView:
    """A KVCache stand-in for ``Decoder.forward`` decoding one token per row, each row at its own position."""

    def __init__(self, runner: SlotRunner, rows: torch.Tensor, pos: torch.Tensor, S: int) -> None:
        self.r, self.rows, self.p, self.S = runner, rows, pos, S

    @property
    def pos(self) -> int:  # the decoder's offset: keys span S = pos + 1 positions
        return self.S - 1

    @pos.setter
    def pos(self, value: int) -> None:  # the decoder advances it; lengths are kept by the runner
        pass

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.rows.numel()
        self.r.rewritten(self.rows, self.p)
        self.r.k[layer][self.rows, :, self.p] = k[:, :, 0]
        self.r.v[layer][self.rows, :, self.p] = v[:, :, 0]
        return self.r.k[layer, :n, :, : self.S], self.r.v[layer, :n, :, : self.S]


def stream_layout(model: nn.Module) -> int:
    """Lay out each plain float32 CPU linear weight, in place, as its one-row products (decoding) stream fastest
    here: row-major where the C step's ``lmf_gemv`` reads it (AVX512, rows of a multiple of 16 inputs: 28-36 GB/s
    on SmolLM2-135M), else column-major (the same shape and values in the storage of its transpose) for PyTorch's
    product (its 49,152-row output projection 23 GB/s column-major, 13 row-major; prefill's many-row products run
    at the same speed in both). Tensors loaded on a mapping of a file are copied off it (its pages handed back).
    Only for a model nothing trains (no parameter requires grad: the inference commands freeze what they load), so
    no optimizer or DDP bucket sees a layout change. Returns the number of float32 linear weights laid out."""
    params = list(model.parameters())
    if not params or any(p.requires_grad for p in params):
        return 0
    lib = library()
    weights = {id(m.weight): m.weight for m in model.modules() if type(m) is nn.Linear and m.weight.dim() == 2
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32}  # tied: once
    def row_major(w: torch.Tensor) -> bool:
        return lib is not None and bool(lib.lmf_gemv_ok(w.shape[1]))

    todo = [w for w in weights.values() if not (w.is_contiguous() if row_major(w) else w.stride() == (1, w.shape[0]))]
    if not todo and model.__dict__.get("_lmforge_laid_out"):  # by an earlier runner: no maps read, nothing copied
        return len(weights)
    mapped = file_mappings()
    tensors = {id(t): t for t in (*params, *model.buffers())}.values()
    quantized = {id(b) for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))
                 for b in m.buffers(recurse=False)}
    # pages are handed back only from a storage no other tensor of the model views (two parameters loaded from
    # one tensor of the file keep theirs until both are copied)
    users = collections.Counter(t.untyped_storage().data_ptr() for t in tensors)

    def replace(t: torch.Tensor, new: torch.Tensor) -> None:  # one weight at a time: memory peaks by one weight
        old = t.data
        t.data = new
        if mapped and users[old.untyped_storage().data_ptr()] == 1:
            drop_file_pages(old.data_ptr(), old.numel() * old.element_size(), mapped)

    with torch.no_grad(), torch.inference_mode(False):  # ordinary tensors, even when called in inference mode
        for w in todo:
            replace(w, w.data.contiguous() if row_major(w) else w.data.t().contiguous().t())
        # tensors loaded from safetensors share one mapping of the file: the rest on it copied too (only those: a
        # tensor another model shares, as a draft shares the model's norms, keeps the storage its runners point into)
        # (not a quantized layer's: lmforge.quant.io maps them to be used in place, and the C layouts built from
        # them hand their pages back)
        for t in tensors:
            if t.device.type == "cpu" and _on_mapping(t, mapped) and id(t) not in quantized:
                replace(t, t.data.clone())
    model.__dict__["_lmforge_laid_out"] = True
    return len(weights)


def _on_mapping(t: torch.Tensor, mapped) -> bool:
    """Whether ``t``'s storage lies in one of the file mappings ``mapped`` ((start, end) address ranges)."""
    p = t.untyped_storage().data_ptr()
    return any(start <= p < end for start, end, *_ in mapped)


def decode_plans(model: nn.Module) -> dict:
    """The decode plans measured for ``model`` (see SlotRunner._plan_for), kept on it and shared by its runners:
    a new generation (a chat turn, each ``generate`` call) does not time them again."""
    plans = model.__dict__.get("_lmforge_decode_plans")
    if plans is None:
        plans = model.__dict__["_lmforge_decode_plans"] = {}
    return plans


def fast_path_supported(model: Decoder) -> bool:
    """Whether the lean decode step covers this model (everything but GLM's 2D positions and bottleneck adapters,
    in eval mode; prefix/prompt tuning only fill the start of the cache and need nothing of the decode step)."""
    adapters = any(b.adapter_attn is not None or b.adapter_mlp is not None for b in model.blocks)
    return model.cfg.position in ("rope", "learned", "none", "alibi") and not model.training and not adapters


class SlotRunner:
    """A key/value cache of ``n_slots`` sequences of up to ``max_len`` positions, with prefill and batched decode.

    The cache is allocated as it is used: ``slots`` x ``cap`` positions, grown by doubling when a prompt or a step
    needs more (what is written is copied), and given back by ``release``. Sixteen short chats with SmolLM2 (8,192
    positions of context) take 16 x 256 positions, not 16 x 8,192 (5.9 GB)."""

    def __init__(self, model: Decoder, n_slots: int, max_len: int | None = None) -> None:
        cfg = model.cfg
        self.model, self.cfg, self.n_slots = model, cfg, n_slots
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_len = kv_cache_len(cfg, n_slots, min(max_len, cfg.block_size) if max_len else None,
                                    self.dtype, self.device)  # checked before allocating
        if hasattr(model, "rotary"):
            model.rotary.ensure(self.max_len)  # rotary tables are built lazily for long contexts
        # bytes of one position of one slot, keys and values of every layer
        self.per_pos = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_size * p.element_size()
        self.slots = self.cap = 0  # allocated so far (reserve grows them)
        self.k = self.v = self._cache(0, 0)
        # heads of 8 channels (stories260K) decode over a copy of the cache transposed in blocks of 16 positions
        # (attn_args.kvb in native.c), made by the C step as it reads: kv_blocks (layers, blocks, slots, kv heads,
        # keys/values, 8, 16); kv_blocks_len (layers, slots): positions copied so far (lowered where the cache is
        # written otherwise: rewritten)
        self._kv_blocks_ok = cfg.head_size == 8 and self.dtype == torch.float32 and self.device.type == "cpu"
        self.kv_blocks = self.kv_blocks_len = None
        self._kv_len_np: np.ndarray | None = None
        self.k_flat: list[torch.Tensor] = []  # per layer (slots * kv_heads * cap, head_dim) views
        self.v_flat: list[torch.Tensor] = []
        self._heads = torch.arange(cfg.kv_heads, device=self.device)[None]
        self._layers: list[_Layer] | None = None
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lens = [0] * n_slots  # positions written per slot (virtual tokens of prefix/prompt tuning included)
        self.nv = model.num_virtual_tokens
        self.rows = torch.arange(n_slots, device=self.device)
        self.keys = torch.arange(self.max_len, device=self.device)
        self.fast = fast_path_supported(model)
        # quantized products compute by row count (bfloat16 kernels for a few rows): a prefill stays the decoder's,
        # except where every one is lmf_int4 (integer dot products: each row computed alike at any row count)
        self._quantized = any(isinstance(m, QuantLinear) and not int4_ok(m) for m in model.blocks.modules())
        self._native_ok: bool | None = None  # NativeStep.supported, asked at the first decode step
        self._native: dict[int, NativeStep] = {}  # rows -> the step planned for them
        self._c_products: bool | None = None  # the last step planned was all C products (NativeStep.c_products)
        self._started: NativeStep | None = None  # a step begun by start, until finish
        self.begun_seconds = 0.0  # the last begun step's time under way (finish)
        # one-call steps decode on the library's thread and the caller's (see pair_threads): no OpenMP team
        self.pair = False
        self.transposed: dict = {}  # id(linear) -> (signature, weight transposed, bias): shared by the C steps
        self._path = decode_plans(model)  # (rows, threads) -> the plan kept, or the trials' times
        self._warm: set[int] = set()
        self._table: tuple | None = None  # the embedding table, its numpy view and its module
        self.local = [cfg.layer_is_local(i) for i in range(cfg.n_layer)]
        if cfg.position == "rope":
            self._rope_matrix_parts()
        stream_layout(model)

    # ---- the cache --------------------------------------------------------------------------------
    def _grown(self, slots: int, length: int) -> tuple[int, int]:
        s = self.slots if slots <= self.slots else min(self.n_slots, 1 << (slots - 1).bit_length())
        c = self.cap if length <= self.cap else min(self.max_len, max(length, 2 * self.cap, MIN_CACHE_LEN))
        return s, c

    def cache_bytes(self, slots: int, length: int) -> int:
        """Bytes the cache would take once it holds ``slots`` slots of ``length`` positions."""
        s, c = self._grown(slots, length)
        return s * c * self.per_pos

    def reserve(self, slots: int, length: int) -> None:
        """Make the cache hold slots ``0..slots-1`` with ``length`` positions each (slots grow to powers of two,
        positions by doubling; what is written is kept). A step planned on the old cache is planned again."""
        self._not_started()
        if slots <= self.slots and length <= self.cap:
            return
        if slots > self.n_slots or length > self.max_len:
            raise ValueError(f"KV cache full: {slots} slots x {length} positions > {self.n_slots} x {self.max_len}")
        size = self._grown(slots, length)
        k, v = self._cache(*size), self._cache(*size)
        if self.slots and self.cap:
            k[:, : self.slots, :, : self.cap] = self.k
            v[:, : self.slots, :, : self.cap] = self.v
        self._set_cache(k, v)

    def idle(self, positions: int) -> None:
        """Nothing runs and the next request needs ``positions``: a cache far longer goes back (it is kept otherwise:
        no allocation, no replanning)."""
        if self.cap >= 2 * max(positions, MIN_CACHE_LEN):
            self.release()

    def release(self) -> None:
        """Give the cache back (nothing is running): the next prefill allocates what it needs."""
        self._not_started()
        if self.slots or self.cap:
            empty = self._cache(0, 0)
            self._set_cache(empty, empty)
            self.lens = [0] * self.n_slots
            release_free_memory()

    def _cache(self, slots: int, length: int) -> torch.Tensor:
        cfg = self.cfg
        return torch.zeros(cfg.n_layer, slots, cfg.kv_heads, length, cfg.head_size, device=self.device,
                           dtype=self.dtype)

    def _set_cache(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        self.slots, self.cap = k.shape[1], k.shape[3]
        self.kv_blocks = self.kv_blocks_len = self._kv_len_np = None
        if (self._kv_blocks_ok and self.slots and self.cap and self.fast and NativeStep.supported(self.model, self)
                and library().lmf_kv_blocks_ok()):  # (supported: the library is there)
            self.kv_blocks = torch.zeros(self.cfg.n_layer, -(-self.cap // 16), self.slots, self.cfg.kv_heads, 2, 8, 16)
            self.kv_blocks_len = torch.zeros(self.cfg.n_layer, self.slots, dtype=torch.int32)
            self._kv_len_np = self.kv_blocks_len.numpy()
        self.k_flat = [t.view(-1, self.cfg.head_size) for t in k.unbind(0)]
        self.v_flat = [t.view(-1, self.cfg.head_size) for t in v.unbind(0)]
        self._views.clear()
        self._native.clear()

    def rewritten(self, slots: list[int] | torch.Tensor, pos: int | torch.Tensor) -> None:
        """The cache of ``slots`` is written from ``pos`` on (each slot's own where ``pos`` is a tensor) other than by
        the C step (which keeps the transposed copy itself): the copy of those positions is made again when read."""
        if self._kv_len_np is not None:
            s = slots.cpu().numpy() if isinstance(slots, torch.Tensor) else np.asarray(slots)
            p = pos.cpu().numpy() if isinstance(pos, torch.Tensor) else pos
            self._kv_len_np[:, s] = np.minimum(self._kv_len_np[:, s], p)

    # ---- prefill ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], every: bool = False) -> torch.Tensor:
        """Write ``ids`` into ``slot`` from position 0; return the logits (V,) after the last one (``every``:
        (len(ids), V) after each)."""
        self._not_started()
        if not ids:
            raise ValueError("the prompt must hold at least one token (e.g. BOS)")
        if len(ids) + self.nv > self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of {self.max_len - self.nv}")
        self.lens[slot] = 0
        logits = self._prefill_native([slot], [ids], every=every)
        if logits is not None:
            return logits if every else logits[0]
        x = torch.tensor([ids], device=self.device)
        view = _SlotView(self, slot)
        with _flash_for(self.model, len(ids)):  # long prompts: attention through lmf_flash (float32 CPU)
            h = self.model.hidden_states(x, cache=view)[0]
        self.lens[slot] = view.pos
        return self.model.lm_head(h if every else h[-1])

    @torch.inference_mode()
    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Prefill several prompts in one forward, right-padded (causal attention never looks at the padding
        after a prompt); logits (len(prompts), V) after each prompt's last token."""
        self._not_started()
        if any(not p for p in prompts) or max(len(p) for p in prompts) + self.nv > self.max_len:
            raise ValueError("every prompt must hold between 1 and max_len tokens")
        for s in slots:
            self.lens[s] = 0
        logits = self._prefill_native(slots, prompts)
        if logits is not None:
            return logits
        P = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (P - len(p)) for p in prompts], device=self.device)
        rows = torch.tensor(slots, device=self.device)
        with _flash_for(self.model, P):
            h = self.model.hidden_states(ids, cache=_SlotsView(self, rows))
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        for s, p in zip(slots, prompts):
            self.lens[s] = len(p) + self.nv
        return self.model.lm_head(h[torch.arange(len(prompts), device=self.device), last])

    @torch.inference_mode()
    def extend(self, slot: int, ids: list[int], every: bool = True) -> torch.Tensor:
        """Write ``ids`` into ``slot`` at its next positions in one forward; the logits (len(ids), V) after each of them
        (``every=False``: (1, V) after the last). Speculative decoding checks drafted tokens so; setting
        ``lens[slot]`` back takes positions back."""
        self._not_started()
        start = self.lens[slot]
        if not ids or start + len(ids) > self.max_len:
            raise ValueError(f"KV cache full: {start + len(ids)} positions > max_len {self.max_len}")
        logits = self._prefill_native([slot], [ids], start, every=every)
        if logits is not None:
            return logits
        view = _SlotView(self, slot)
        view.pos = start
        h = self.model.hidden_states(torch.tensor([ids], device=self.device), cache=view)[0]
        self.lens[slot] = view.pos
        return self.model.lm_head(h if every else h[-1:])

    def _prefill_native(self, slots: list[int], prompts: list[list[int]], start: int = 0,
                        every: bool = False) -> torch.Tensor | None:
        """Short prompts through the C step (``lmforge.infer.native``): every prompt token is a row at its slot and
        position, a prompt's rows in order, so each attends to the keys its predecessors wrote in the same call.
        Rows are padded to a power of two up to 16, then to a multiple of 32 (steps are planned per row count). A
        prefill through the decoder pays its per-layer Python whatever the prompt's length: a 9-token prompt of
        stories260K took 0.63 ms there, 0.13 ms here. Logits (len(prompts), V) after each prompt's last token, or
        None where the C step does not apply, the model is quantized other than in lmf_int4's layers (the others
        compute by row count: the prefill stays the decoder's) or the prompts hold more than ``NATIVE_PREFILL_ROWS``
        tokens. ``start``: the prompts continue their slots from that position; ``every``: the logits of every row."""
        total = sum(len(p) for p in prompts)
        if not self.fast or total > NATIVE_PREFILL_ROWS or self._native_ok is False or self._quantized:
            return None
        self.reserve(max(slots) + 1, start + max(len(p) for p in prompts))
        n = 1 << (total - 1).bit_length() if total <= 16 else -(-total // 32) * 32
        step = self._native_step(n)
        if step is None:
            return None
        tok = [t for p in prompts for t in p] + [0] * (n - total)
        pos = [start + i for p in prompts for i in range(len(p))] + [-1] * (n - total)
        rows = [s for s, p in zip(slots, prompts) for _ in p] + [0] * (n - total)
        last = list(itertools.accumulate(len(p) for p in prompts))
        x = self._step_input(tok, [max(i, 0) for i in pos])
        try:
            logits = step.run(x, pos, rows, list(range(total)) if every else [i - 1 for i in last])
        except Stale:
            self._native.clear()
            return None
        for s, p in zip(slots, prompts):
            self.lens[s] = start + len(p)
        return logits

    # ---- decode -----------------------------------------------------------------------------------
    def decode(self, tokens: list[int | None]) -> torch.Tensor:
        """Append ``tokens[i]`` to slot i for every i with a token (None = idle slot); the logits (k, V) of those k
        slots, in slot order. Where the step is all C products (a small float32 model, int4) it computes only those
        rows, each at its slot: a request left alone in slot 5 decodes one row, not six. A one-call step on a pair of
        threads (``pair``) is begun and joined (``start``, ``finish``)."""
        self._not_started()
        if self.pair and self.start(tokens):  # the library's thread and this one
            return self.finish()
        ready = self._whole(tokens)
        if ready is not None:  # the common step of a small float32 model: one C call, nothing to plan
            step, lens, ids, table, live = ready
            try:
                logits = step.run((table, ids), lens, None if len(live) == len(tokens) else live)
            except Stale:  # (raised before the cache was written) planned again there
                return self._decode(tokens)
            for i in live:
                self.lens[i] += 1
            return logits
        return self._decode(tokens)

    def _whole(self, tokens: list[int | None]
               ) -> tuple[NativeStep, list[int], list[int], np.ndarray, list[int]] | None:
        """For a step of the given ``tokens`` (a row each, at its slot) whose whole C step (``NativeStep.whole``) is
        planned and has run, whose rows fit the cache as it is and whose embedding rows the step gathers from the
        table itself: (the step, the rows' positions, their ids, the table, their slots). None otherwise:
        ``_decode``, which also plans, grows the cache and times plans, under ``torch.inference_mode`` (stories260K,
        one row: 40 us a decode that way, 33 this way)."""
        dense = None not in tokens  # (slots 0 .. n - 1 all given a token: the lists as they are)
        live = list(range(len(tokens))) if dense else [i for i, t in enumerate(tokens) if t is not None]
        n = len(live)
        step = self._native.get(n)
        if step is None or not step.whole or n not in self._warm or not step.current():
            return None
        table = self._table_np()
        lens = self.lens[:n] if dense else [self.lens[i] for i in live]
        if table is None or live[-1] >= self.slots or max(lens) >= self.cap:
            return None
        return step, lens, tokens if dense else [tokens[i] for i in live], table, live

    @torch.inference_mode()
    def _decode(self, tokens: list[int | None]) -> torch.Tensor:
        live = [i for i, t in enumerate(tokens) if t is not None]
        if len(live) < len(tokens):  # idle slots among them: the given rows alone where the step maps rows to slots
            logits = self._decode_live(tokens, live)
            if logits is not None:
                return logits
        logits = self._decode_all(tokens)
        return logits if len(live) == len(tokens) else take_rows(logits, live)

    def _decode_live(self, tokens: list[int | None], live: list[int]) -> torch.Tensor | None:
        """``decode`` of the rows of the ``live`` slots alone, each at its slot, where their step is all C products
        (planned without trials, at the caller's threads); None where it is not (nothing written): ``_decode_all``."""
        lens = [self.lens[i] for i in live]
        if not self.fast or not self._c_products or max(lens) + 1 > self.max_len:  # (known once a step was planned)
            return None
        self.reserve(live[-1] + 1, max(lens) + 1)  # (before the step: a grown cache plans steps again)
        x = self._step_input([tokens[i] for i in live], lens)
        for _ in range(2):  # a stale step (a weight changed: raised before the cache is written) planned again once
            step = self._native_step(len(live))
            if step is None or not step.c_products:
                return None
            self._plan_for(len(live), True, whole=True)  # (kept as _decode_all keeps such a step: no trials)
            try:
                logits = step.run(x, lens, live)
                break
            except Stale:
                self._native.clear()
        else:
            return None
        for i in live:
            self.lens[i] += 1
        self._warmed(len(live))
        return logits

    def _decode_all(self, tokens: list[int | None]) -> torch.Tensor:
        """A step of a row per slot up to ``len(tokens)``, the idle ones as padding: logits (len(tokens), V)."""
        n = len(tokens)
        lens = [self.lens[i] if t is not None else 0 for i, t in enumerate(tokens)]
        S = max(lens) + 1
        if S > self.max_len:
            raise ValueError(f"KV cache full: {S} positions > max_len {self.max_len}")
        self.reserve(n, S)
        ids = [t if t is not None else 0 for t in tokens]
        logits = None
        step = self._native_step(n) if self.fast else None
        plan = self._plan_for(n, step is not None, whole=step is not None and step.c_products)
        use = step is not None and plan[0]
        threads = torch.get_num_threads()
        if plan[1] != threads:
            torch.set_num_threads(plan[1])
        t0 = time.perf_counter()
        try:
            if use:
                x = self._step_input(ids, lens)
                try:
                    logits = step.run(x, lens)
                except Stale:  # a layer's weight or compute mode changed: planned again (a redone step rewrites
                    self._native.clear()  # the same cache positions)
                    step = self._native_step(n)
                    use = step is not None
                    logits = step.run(x, lens) if use else None
            if logits is None:
                tok = torch.tensor(ids, device=self.device)
                pos = torch.tensor(lens, device=self.device)
                if self.fast:
                    ragged = any(t is None or lens[i] != S - 1 for i, t in enumerate(tokens))
                    logits = self._fast(tok, pos, n, S, ragged)
                else:
                    logits = self._slow(tok, pos, n, S)
            self._timed((n, threads), plan, time.perf_counter() - t0)
        finally:
            if plan[1] != threads:
                torch.set_num_threads(threads)
        for i, t in enumerate(tokens):
            if t is not None:
                self.lens[i] += 1
        self._warmed(n)
        return logits

    def _warmed(self, n: int) -> None:
        """A step of ``n`` rows has run: after the first (it builds and times kernel layouts), memory given back."""
        if n not in self._warm:
            self._warm.add(n)
            release_free_memory()

    def pair_threads(self) -> bool:
        """Decode with two threads where the step is one C call (a small float32 model, ``NativeStep.whole``): the
        library's background thread and the caller's, taking the step's rows four at a time (``start``; ``finish``
        computes the rows the library's thread has not taken), instead of an OpenMP team. The caller then keeps one
        torch thread (``Engine`` does): libgomp's worker spins between parallel regions, and on two cores it took
        one from the step begun in the background. stories260K served on 2 cores, two servers in turn: see
        ``Engine``. False (nothing changed) where the step is not one C call."""
        step = self._native_step(1) if self.fast else None
        self.pair = step is not None and step.whole and bool(step.lib.lmf_step_thread_ok())
        return self.pair

    def _not_started(self) -> None:
        if self._started is not None:
            raise RuntimeError("a decoding step is under way: finish() it first")

    def start(self, tokens: list[int | None]) -> bool:
        """``decode(tokens)`` begun in the background where its step is one C call (a small float32 model: see
        ``NativeStep.start``) and the runner decodes on a pair of threads (``pair_threads``) or has two torch threads
        or more: the step runs on the library's thread, and the caller goes on (with the cache and planned step as
        they are) while it runs; ``finish`` computes the rows not yet taken and gives the logits (without a pair,
        the engine begins only one request's steps: a step of many rows is faster on OpenMP's threads then). Only
        ``finish`` may be called meanwhile. False: nothing begun (call ``decode``)."""
        self._not_started()
        ready = self._whole(tokens) if self.pair or torch.get_num_threads() > 1 else None
        if ready is None:
            return False
        step, lens, ids, table, live = ready
        try:
            if not step.start((table, ids), lens, None if len(live) == len(tokens) else live):
                return False
        except Stale:  # a layer's weight changed: decode plans the step again
            return False
        self._started = step
        for i in live:
            self.lens[i] += 1
        return True

    def finish(self) -> torch.Tensor:
        """The logits (k, V) of the step ``start`` began (as ``decode``'s), once it has ended; ``begun_seconds``: from
        its start to the end of its computation (whenever it was joined)."""
        step, self._started = self._started, None
        if step is None:
            raise RuntimeError("no decoding step was started")
        logits = step.finish()
        self.begun_seconds = step.seconds
        return logits

    def _native_step(self, n: int) -> NativeStep | None:
        """The C-assisted step for ``n`` rows (``lmforge.infer.native``), planned at first use; None where it does
        not apply (no compiler, or a model it does not cover)."""
        if self._native_ok is None:
            self._native_ok = NativeStep.supported(self.model, self)
        if not self._native_ok:
            return None
        step = self._native.get(n)
        if step is None or not step.current():
            try:
                step = self._native[n] = NativeStep(self, n)
                self._c_products = step.c_products
            except (ValueError, Stale):
                self._native_ok = False
                return None
        return step

    def _plan_for(self, n: int, native: bool, whole: bool = False) -> Plan:
        """How a step of ``n`` rows runs: (the C-assisted step or not, torch threads), measured, not assumed. The
        candidates are both steps (the C one where ``native``) at the caller's threads and at one thread. Until each
        has run NATIVE_TRIALS timed steps of ``n`` rows (after one untimed step: layouts are built then) they take
        turns; then the fastest is kept. Small products lose more to the threads' hand-offs than they gain
        (stories260K, 2 cores: one row 0.09 ms a step on one thread, 0.12-0.20 ms on two; 16 rows faster on two).
        ``LMFORGE_NATIVE=1`` always takes the C step (where it applies). A ``whole`` step (no PyTorch product in it:
        a small model's one C call, or every product lmf_int4) is kept without trials, at the caller's threads (its
        C calls share work among them only where it is large enough): the PyTorch step pays per layer what it saves
        (stories260K: 0.05 against 0.3 ms a row; SmolLM2 int4: 4.0 against 5.1 ms at one row), its trials would
        build PyTorch's packed copy of every int4 weight, and trials of the slower plans cost a serving model 3-16 ms
        a step under load."""
        threads = torch.get_num_threads()
        chosen = self._path.get((n, threads))
        if isinstance(chosen, tuple):
            return chosen
        if whole:
            chosen = self._path[n, threads] = (True, threads)
            return chosen
        if chosen is None:
            forced = native and os.environ.get("LMFORGE_NATIVE") == "1"
            cands = [(p, t) for p in ((True,) if forced else (True, False) if native else (False,))
                     for t in ((threads, 1) if threads > 1 else (threads,))]
            if len(cands) == 1:
                self._path[n, threads] = cands[0]
                return cands[0]
            chosen = self._path[n, threads] = {c: [] for c in cands}
        return min(chosen, key=lambda c: len(chosen[c]))  # the first with the fewest trials

    def _timed(self, key: tuple[int, int], plan: Plan, seconds: float) -> None:
        times = self._path.get(key)
        if isinstance(times, dict) and plan in times:
            times[plan].append(seconds)
            if min(len(t) for t in times.values()) > NATIVE_TRIALS:
                self._path[key] = min(times, key=lambda c: min(times[c][1:]))

    def _head_fn(self):
        """The output projection as a function of the final hidden states (n, D) float32."""
        return _linear_fn(self.model.lm_head)

    def _step_input(self, ids: list[int], pos: list[int]) -> torch.Tensor | tuple[np.ndarray, list[int]]:
        """The C step's input for tokens ``ids`` at positions ``pos`` (see ``NativeStep.run``): a plain float32
        embedding table as numpy with the ids, whose rows the step gathers itself (three tensor operations fewer:
        a small model's step is ~20 us in C, stories260K served one stream 27 % faster), or else the embedded rows."""
        table = self._table_np()
        if table is None:
            return self._embed(torch.tensor(ids), torch.tensor(pos) if self.cfg.position == "learned" else None)
        return table, ids

    def _table_np(self) -> np.ndarray | None:
        """The embedding table as numpy where the step's input is just its rows (a plain float32 table), else None."""
        wte = self.model._modules["wte"]  # (nn.Module's attribute lookup is Python code: 1 us a step)
        if self._table is not None and wte._parameters.get("weight") is self._table[0] and wte is self._table[2]:
            return self._table[1]
        m, cfg = self.model, self.cfg
        w = m.wte.weight if type(m.wte) is nn.Embedding else None
        if (w is None or w.dtype != torch.float32 or cfg.embedding_scale != 1.0 or cfg.embedding_grad_shrink != 1.0
                or cfg.position == "learned" or cfg.embedding_norm):
            return None
        self._table = (w, w.detach().numpy(), wte)  # (a view: the table's own memory)
        return self._table[1]

    def _embed(self, tok: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """The decode step's input (n, D): token embeddings (scaled), learned positions (``pos``: needed only for
        them), embedding norm."""
        m, cfg = self.model, self.cfg
        x = F.embedding(tok, m.wte.weight) if type(m.wte) is nn.Embedding else m.wte(tok)  # (n, D)
        if cfg.embedding_scale != 1.0:
            x = x * cfg.embedding_scale
        if cfg.embedding_grad_shrink != 1.0:  # as the decoder computes it (a no-op up to rounding)
            a = cfg.embedding_grad_shrink
            x = x * a + x * (1 - a)
        if cfg.position == "learned":
            x = x + m.wpe.weight[pos]
        if cfg.embedding_norm:
            x = m.emb_norm(x)
        return x

    def _slow(self, tok: torch.Tensor, pos: torch.Tensor, n: int, S: int) -> torch.Tensor:
        key_mask = self.keys[None, :S] <= pos[:, None]
        position_ids = pos[:, None] - self.nv  # the decoder counts positions of real tokens past the virtual ones
        if self.cfg.position == "glm2d":
            position_ids = torch.stack([position_ids, torch.zeros_like(position_ids)], dim=1)
        return self.model(tok[:, None], position_ids=position_ids, key_mask=key_mask,
                          cache=_RowsView(self, self.rows[:n], pos, S))[:, -1]

    def _rope_matrix_parts(self) -> None:
        """Rotary embedding as a matrix per position: x @ (diag(cos) + R * sin), R the signed pair swap."""
        hd, rd = self.cfg.head_size, self.cfg.rotary_dim
        R = torch.zeros(hd, hd, device=self.device, dtype=self.dtype)
        if self.cfg.rope_interleaved:  # (x0, x1) -> (-x1, x0)
            for i in range(0, rd, 2):
                R[i + 1, i], R[i, i + 1] = -1.0, 1.0
        else:  # halves: (x1, x2) -> (-x2, x1)
            h = rd // 2
            for j in range(h):
                R[j + h, j], R[j, j + h] = -1.0, 1.0
        self._R = R
        self._pass = hd - rd
        self._rope_table = None
        if self.max_len * hd * hd <= 1 << 22:  # small: one matrix per position, gathered in one step
            self._rope_table = self._rope_matrix(torch.arange(self.max_len, device=self.device))

    def _rope_matrix(self, pos: torch.Tensor) -> torch.Tensor:
        if self._rope_table is not None:
            return self._rope_table[pos]
        rot = self.model.rotary
        cos, sin = rot.cos[pos].to(self.dtype), rot.sin[pos].to(self.dtype)  # (n, rd)
        if self._pass:
            cos = torch.cat([cos, cos.new_ones(cos.shape[0], self._pass)], dim=-1)
            sin = torch.cat([sin, sin.new_zeros(sin.shape[0], self._pass)], dim=-1)
        return torch.diag_embed(cos) + self._R * sin[:, None, :]  # (n, hd, hd)

    def _fast(self, tok: torch.Tensor, pos: torch.Tensor, n: int, S: int, ragged: bool) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        if self._layers is None:
            self._layers = [_Layer(blk, cfg, i) for i, blk in enumerate(m.blocks)]
            self._final = _norm_fn(m.norm_f) if cfg.final_norm else None
            self._head = self._head_fn()
            self._mirror_norm = _mirror_ready(m, self._layers)
            self._mirror = self._mirror_norm is not None
        x = self._embed(tok, pos)
        rope = self._rope_matrix(pos) if cfg.position == "rope" else None
        keys = self.keys[None, :S]
        nkv, M, H = cfg.kv_heads, self.cap, cfg.n_head
        rep = H // nkv
        neg = torch.finfo(self.dtype).min
        # additive attention biases (n * kv_heads, heads per kv head, S) for dense and local layers
        if cfg.position == "alibi" or ragged or any(self.local):
            valid = keys <= pos[:, None]  # (n, S)
            if cfg.position == "alibi":
                base = m.alibi.to(self.dtype).view(1, -1, 1) * (keys - pos[:, None]).to(self.dtype)[:, None]
            else:
                base = torch.zeros(n, 1, S, device=self.device, dtype=self.dtype)
            dense = base.masked_fill(~valid[:, None], neg).expand(n, H, S).reshape(n * nkv, rep, S)
            local = None
            if any(self.local):
                ok = valid & (keys > pos[:, None] - cfg.local_window)
                local = base.masked_fill(~ok[:, None], neg).expand(n, H, S).reshape(n * nkv, rep, S)
            masks = {False: dense, True: local}
        else:
            zero = torch.zeros(n * nkv, rep, S, device=self.device, dtype=self.dtype)
            masks = {False: zero, True: zero}
        # where each row's new key/value goes in the flattened (slots * kv_heads * cap, head_dim) cache
        self.rewritten(self.rows[:n], pos)
        widx = ((self.rows[:n, None] * nkv + self._heads) * M + pos[:, None]).view(-1)
        if n not in self._views:
            self._views[n] = (self.k[:, :n].flatten(1, 2), self.v[:, :n].flatten(1, 2))
        kall, vall = self._views[n]
        ks = kall[:, :, :S].transpose(-1, -2).unbind(0)  # per layer (n * kv_heads, head_dim, S)
        vs = vall[:, :, :S].unbind(0)  # per layer (n * kv_heads, S, head_dim)
        if self._mirror:  # carry the residual stream as [x, -x]: every RMSNorm is then one LayerNorm call
            x = torch.cat([x, x.neg()], dim=-1)
        for i, L in enumerate(self._layers):
            bias = masks[L.local]

            def attn(h, L=L, i=i, bias=bias):
                """Attention before the output projection: (n, heads * head_dim)."""
                nh, hd = L.nh, L.hd
                qkv = L.qkv(h)  # (n, (nh + 2 nkv) hd)
                if rope is not None:
                    qk = torch.bmm(qkv[:, : L.qk_end].view(n, L.nqk, hd), rope)
                    q, k = qk[:, :nh], qk[:, nh:]
                else:
                    q, k = qkv[:, : nh * hd], qkv[:, nh * hd : L.qk_end]
                self.k_flat[i].index_copy_(0, widx, k.reshape(n * nkv, hd))
                self.v_flat[i].index_copy_(0, widx, qkv[:, L.qk_end :].reshape(n * nkv, hd))
                scores = torch.baddbmm(bias, q.reshape(n * nkv, rep, hd), ks[i], alpha=L.scale)
                return torch.bmm(torch.softmax(scores, dim=-1), vs[i]).view(n, nh * hd)

            x = L.forward_mirror(x, attn) if self._mirror else L.forward(x, attn)
        if self._mirror:
            d = cfg.n_embd
            w2 = self._mirror_norm
            x = torch.layer_norm(x, (2 * d,), w2, None, m.norm_f.eps)[:, :d] if cfg.final_norm else x[:, :d]
        elif self._final is not None:
            x = self._final(x)
        return self._head(x)


def _flash_for(model: nn.Module, rows: int):
    """``flash_attention_in(model)`` for a forward of ``rows`` query rows; nothing under ``FLASH_MIN_ROWS``, where the
    kernel never applies (setting and restoring every layer's kernel costs ~0.2 ms on SmolLM2)."""
    return flash_attention_in(model) if rows >= FLASH_MIN_ROWS else contextlib.nullcontext()


def _linear_fn(mod: nn.Module):
    """``mod`` as a function, skipping Module.__call__ on the hot path where that changes nothing (plain and
    quantized linear layers without hooks); other wrappers (LoRA...) are called as modules."""
    if type(mod) is nn.Linear:
        w, b = mod.weight, mod.bias
        return lambda x: linear(x, w, b)
    if type(mod) is QuantLinear and not (mod._forward_hooks or mod._forward_pre_hooks):
        def quant(x):  # (rows, K) input: the layer's function for that many rows, made by its first forward
            fn = mod._decode.get(x.shape[0])  # (filled only for float32 CPU input in auto mode; read per call:
            return fn(x) if fn is not None else mod.forward(x)  # a new weight empties it)
        return quant
    return mod


def _residual_fn(mod: nn.Module):
    """r, h -> r + mod(h), as one addmm for a plain bias-free linear layer."""
    if type(mod) is nn.Linear and mod.bias is None:
        wt = mod.weight.t()
        return lambda r, h: torch.addmm(r, h, wt)
    f = _linear_fn(mod)
    return lambda r, h: r + f(h)


def _norm_fn(mod: nn.Module):
    from lmforge.model.norms import RMSNorm

    if type(mod) is RMSNorm and mod.weight.dtype == torch.float32:
        # RMSNorm as LayerNorm of [x, -x]: zero mean, variance mean(x^2); one fused kernel instead of several ops
        d, eps, w2 = mod.weight.numel(), mod.eps, torch.cat([mod.weight, mod.weight]).detach()

        def rms(x):
            if x.dtype != torch.float32:
                return mod(x)
            return torch.layer_norm(torch.cat([x, x.neg()], dim=-1), (2 * d,), w2, None, eps)[..., :d]

        return rms
    if type(mod) is nn.LayerNorm:
        shape, w, b, eps = mod.normalized_shape, mod.weight, mod.bias, mod.eps
        return lambda x: torch.layer_norm(x, shape, w, b, eps)
    return mod


def _mirror_ready(model: Decoder, layers: list[_Layer]):
    """For small pre-norm RMSNorm models in float32 (where per-op overhead dominates): the doubled final-norm weight
    that switches the decode step to a residual stream kept as [x, -x] (its output projections write both halves),
    else None."""
    from lmforge.model.norms import RMSNorm

    cfg = model.cfg

    def plain(lin) -> bool:
        return type(lin) is nn.Linear and lin.bias is None and lin.weight.dtype == torch.float32

    def rms(norm) -> bool:
        return type(norm) is RMSNorm and norm.weight.dtype == torch.float32

    if cfg.norm_placement != "pre" or cfg.parallel_block or cfg.norm != "rmsnorm":
        return None
    for blk in model.blocks:
        if not (rms(blk.norm1) and rms(blk.norm2) and plain(blk.attn.proj) and plain(blk.mlp.fc2)):
            return None
    copied = sum(2 * (b.attn.proj.weight.numel() + b.mlp.fc2.weight.numel()) for b in model.blocks)
    if copied > 1 << 23:  # the doubled projections are copies: only where they are small (and overhead matters)
        return None
    if cfg.final_norm and not rms(model.norm_f):
        return None
    for L, blk in zip(layers, model.blocks):
        L.mirror_weights(blk)
    if not cfg.final_norm:
        return torch.empty(0)
    w = model.norm_f.weight.detach()
    return torch.cat([w, w])


class _Layer:
    """One block's modules and switches, resolved once for the decode step."""

    def __init__(self, blk, cfg, i: int) -> None:
        a = blk.attn
        self.nh, self.nkv, self.hd = a.n_head, a.n_kv, a.hd
        self.nqk, self.qk_end = a.n_head + a.n_kv, (a.n_head + a.n_kv) * a.hd
        self.scale = a.scale if a.scale is not None else a.hd ** -0.5
        self.local = cfg.layer_is_local(i)
        self.qkv, self.proj = _linear_fn(a.qkv), _linear_fn(a.proj)
        self.fc1, self.fc2 = _linear_fn(blk.mlp.fc1), _linear_fn(blk.mlp.fc2)
        self.add_proj, self.add_fc2 = _residual_fn(a.proj), _residual_fn(blk.mlp.fc2)
        self.gated, self.act = blk.mlp.gated, blk.mlp.act
        self.norm1 = _norm_fn(blk.norm1)
        self.norm2 = _norm_fn(blk.norm2) if hasattr(blk, "norm2") else None
        if blk.placement == "sandwich" and not blk.parallel:
            self.norm1_out, self.norm2_out = _norm_fn(blk.norm1_out), _norm_fn(blk.norm2_out)
        self.kind = "parallel" if blk.parallel else blk.placement
        self.alpha = blk.alpha

    def mirror_weights(self, blk) -> None:
        def doubled(lin):  # (in, 2 out): writes [y, -y]
            wt = lin.weight.detach().t()
            return torch.cat([wt, -wt], dim=1).contiguous()

        self.d = blk.norm1.weight.numel()
        self.m_proj, self.m_fc2 = doubled(blk.attn.proj), doubled(blk.mlp.fc2)
        self.m_w1 = torch.cat([blk.norm1.weight, blk.norm1.weight]).detach()
        self.m_w2 = torch.cat([blk.norm2.weight, blk.norm2.weight]).detach()
        self.m_eps1, self.m_eps2 = blk.norm1.eps, blk.norm2.eps

    def forward_mirror(self, x2: torch.Tensor, attn) -> torch.Tensor:
        """A pre-norm block on the residual stream [x, -x] (see ``_mirror_ready``)."""
        d, dd = self.d, (2 * self.d,)
        x2 = torch.addmm(x2, attn(torch.layer_norm(x2, dd, self.m_w1, None, self.m_eps1)[:, :d]), self.m_proj)
        return torch.addmm(x2, self.hidden(torch.layer_norm(x2, dd, self.m_w2, None, self.m_eps2)[:, :d]), self.m_fc2)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def forward(self, x: torch.Tensor, attn) -> torch.Tensor:
        """The block's residual/norm arrangement, as ``Block.forward`` computes it (``attn`` stops before the
        output projection)."""
        kind = self.kind
        if kind == "pre":
            x = self.add_proj(x, attn(self.norm1(x)))
            return self.add_fc2(x, self.hidden(self.norm2(x)))
        if kind == "parallel":
            h = self.norm1(x)
            h2 = self.norm2(x) if self.norm2 is not None else h
            return x + self.proj(attn(h)) + self.fc2(self.hidden(h2))
        if kind == "sandwich":
            x = x + self.norm1_out(self.proj(attn(self.norm1(x))))
            return x + self.norm2_out(self.fc2(self.hidden(self.norm2(x))))
        a = self.alpha  # post-LN and DeepNorm
        x = self.norm1((x * a if a != 1.0 else x) + self.proj(attn(x)))
        return self.norm2((x * a if a != 1.0 else x) + self.fc2(self.hidden(x)))


# ---- continuous batching -------------------------------------------------------------------------


class Engine(BatchEngine):
    """``BatchEngine`` over a PyTorch model (``SlotRunner``), tokens selected by ``lmforge.infer.sampling``.

    ``threads``: torch threads of the engine's thread (default: torch's setting). With OpenMP, a thread that runs
    parallel work keeps a pool of workers of its own; once the threads of all pools outnumber the cores, libgomp
    stops spinning between parallel regions and every packed-kernel call waits for a worker to wake: SmolLM2 int4
    decoded 43 tokens/s in this thread against 147 in the main thread, 2 threads on 2 cores. A caller that keeps its
    own thread at one torch thread (``lmforge serve``: no pool) and gives this thread its threads avoids that.

    With ``PAIR_THREADS`` threads and a model whose step is one C call (``SlotRunner.pair_threads``), this thread keeps
    one torch thread and the library's background thread is the other: every decoding step is begun there and
    joined here (the step before reported meanwhile), with no OpenMP worker spinning between steps. stories260K
    under ``lmforge serve`` on 2 cores, two servers in turn against OpenMP's pair (medians of 6 rounds): one client
    24.6k tokens/s both, two 29.5k -> 34.1k, four 41.9k -> 50.6k, sixteen 60.1k -> 66.2k."""

    def __init__(self, model: Decoder, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 threads: int | None = None, kv_budget: int | None = None) -> None:
        model.eval()
        self.model, self.threads = model, threads
        super().__init__(SlotRunner(model, max_batch, max_len), model.cfg.vocab_size, select, TokenSampler,
                         tokenizer, max_batch, kv_budget)

    def _thread_setup(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if torch.get_num_threads() == PAIR_THREADS and self.runner.pair_threads():
                torch.set_num_threads(1)  # (the library's thread is the second)
        except Exception:  # noqa: BLE001 - planning fails again at the first step, and says so there
            traceback.print_exc(file=sys.stderr)


__all__ = ["BatchEngine", "Engine", "EngineError", "Request", "SlotRunner", "TokenSampler", "fast_path_supported"]
