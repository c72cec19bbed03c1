"""Batch sources for the trainer, all with one interface (``BatchSource``), resumable and rank-aware.

- ``TokenWindows``: fixed-length windows of a token stream (pretraining); random (nanoGPT's ``get_batch``) or
  sequential.
- ``ExampleBatches``: epochs over tokenized examples (SFT, reward, DPO), shuffled per epoch, padded or packed.

Under data parallelism every rank draws the same *global* batch (``batch_size * world`` items) from one seeded
stream and keeps its own slice, so N processes with batch b see exactly what one process with batch N*b sees. The
position in the stream is a small JSON-serialisable ``state_dict()``; ``load_state_dict()`` resumes exactly, also
in the middle of an epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from lmforge.errors import LMForgeError
from lmforge.losses import IGNORE

MODES = ("random", "sequential")
Batch = dict[str, Any]


class StreamMismatch(LMForgeError):
    """A checkpoint's data stream is not this run's (another dataset, batch size or number of processes): the run
    cannot resume from it, though nothing in it is damaged."""


def check_stream(saved: dict[str, Any], mine: dict[str, Any]) -> None:
    """Refuse (StreamMismatch) to continue a data stream ``saved`` whose shape differs from this run's ``mine``."""
    for k, v in mine.items():
        if k not in saved or saved[k] == v:
            continue
        if k == "world":
            how = f"torchrun --nproc-per-node {saved[k]}" if saved[k] > 1 else "one process (without torchrun)"
            raise StreamMismatch(f"written by a run of {saved[k]} process(es), this one has {v}: resume it with "
                                 f"{how}, or give a new --out to start over")
        raise StreamMismatch(f"its data stream has {k}={saved[k]!r}, this run's has {v!r}: cannot resume the same "
                             "stream (a new --out starts over)")


def check_batch_fits(batch_size: int, world: int, count: int, what: str) -> None:
    """Refuse a batch larger than the training set: every batch would repeat it (train.batch_size 1e9 on 18
    examples built a billion rows until memory ran out)."""
    if batch_size * world > count:
        procs = f" x {world} processes" if world > 1 else ""
        raise LMForgeError(f"train.batch_size {batch_size}{procs} is more than the {count} training {what}: every "
                           f"batch would repeat them; use at most {max(1, count // world)}")


@runtime_checkable
class BatchSource(Protocol):
    """What the Trainer draws batches from."""

    def next_batch(self) -> Batch:
        """The next (micro-)batch for this rank: a dict of tensors (and plain values)."""
        ...

    def skip(self, n: int) -> None:
        """Advance by ``n`` batches without building them (loss-spike recovery)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, JSON-serialisable."""
        ...

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """Continue exactly where ``state_dict()`` was taken; a stream of another shape: StreamMismatch."""
        ...

    def fixed_batches(self, n: int, seed: int) -> list[Batch]:
        """``n`` evaluation batches, the same ones at every call (``n <= 0``: a source may return all it has)."""
        ...


class TokenWindows:
    """Batches of fixed-length windows ``x = tokens[i:i+T]``, ``y = tokens[i+1:i+T+1]`` as int64 tensors.

    ``mode="random"``: nanoGPT's ``get_batch`` with its own seeded generator; ``"sequential"``: windows k*T in
    order, wrapping around. Under data parallelism each step draws ``batch_size * world`` windows and rank r takes
    its slice, so ranks differ and world=1 is the plain stream. The position is the number of batches drawn:
    ``state_dict()``/``load_state_dict()`` (JSON-serializable) resume exactly. The interface (next_batch, skip,
    state_dict, load_state_dict, fixed_batches) is the one lmforge's Trainer uses."""

    def __init__(self, tokens: np.ndarray | torch.Tensor, block_size: int, batch_size: int, mode: str = "random",
                 seed: int = 0, rank: int = 0, world: int = 1, offsets: np.ndarray | None = None,
                 documents: bool = False) -> None:
        self.tokens = tokens if isinstance(tokens, np.ndarray) else tokens.numpy()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: allowed values are {list(MODES)}")
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size {block_size} and batch_size {batch_size} must be >= 1")
        if len(self.tokens) < block_size + 1:
            raise LMForgeError(f"only {len(self.tokens):,} tokens: need at least block_size+1 = {block_size + 1}")
        if documents and offsets is None:
            raise ValueError("documents=True needs the document offsets")
        self.block_size, self.batch_size, self.mode = block_size, batch_size, mode
        self.rank, self.world, self.seed = rank, world, seed
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.int64)
        self.documents = documents
        self.gen = torch.Generator().manual_seed(seed)
        self.batches = 0  # batches drawn so far: the resumable position

    @property
    def num_windows(self) -> int:
        """Windows in one sequential epoch (non-overlapping, stride block_size)."""
        return (len(self.tokens) - 1) // self.block_size

    def _starts(self) -> list[int]:
        T, b, n = self.block_size, self.batch_size, self.batch_size * self.world
        if self.mode == "random":
            ix = torch.randint(len(self.tokens) - T, (n,), generator=self.gen)
        else:
            ix = (torch.arange(self.batches * n, (self.batches + 1) * n) % self.num_windows) * T
        return ix[self.rank * b : (self.rank + 1) * b].tolist()

    def batch_at(self, starts: list[int]) -> dict[str, torch.Tensor]:
        """The batch of windows starting at ``starts``."""
        T = self.block_size
        x = np.stack([self.tokens[i : i + T + 1].astype(np.int64) for i in starts])
        out = {"input_ids": torch.from_numpy(x[:, :-1].copy()), "targets": torch.from_numpy(x[:, 1:].copy())}
        if self.documents:
            pos = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(T + 1)  # (B, T+1) token positions
            doc = np.searchsorted(self.offsets, pos, side="right") - 1  # document index of each token
            seg = doc - doc[:, :1]
            out["segment_ids"] = torch.from_numpy(seg[:, :-1].copy())
            out["doc_positions"] = torch.from_numpy((pos - self.offsets[np.maximum(doc, 0)])[:, :-1].copy())
            out["loss_mask"] = torch.from_numpy((seg[:, 1:] == seg[:, :-1]).astype(np.int64))
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.batch_at(self._starts())
        self.batches += 1
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def skip(self, n: int) -> None:
        """Advance by ``n`` batches without building them."""
        if self.mode == "random":
            for _ in range(n):
                torch.randint(len(self.tokens) - self.block_size, (self.batch_size * self.world,), generator=self.gen)
        self.batches += n

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "seed": self.seed, "batches": self.batches, "block_size": self.block_size,
                "batch_size": self.batch_size, "world": self.world, "tokens": len(self.tokens)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        check_stream(s, {"world": self.world, "mode": self.mode, "block_size": self.block_size,
                         "batch_size": self.batch_size, "tokens": len(self.tokens)})
        self.gen.manual_seed(s["seed"])
        self.seed, self.batches = s["seed"], 0
        self.skip(s["batches"])

    def fixed_batches(self, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
        """``n`` batches from a fresh stream with ``seed`` (evaluation: the same batches every time)."""
        other = TokenWindows(self.tokens, self.block_size, self.batch_size, self.mode, seed, self.rank, self.world,
                             self.offsets, self.documents)
        return [other.next_batch() for _ in range(n)]


LENGTH_WINDOW = 16  # batches per window sorted by length (group_by_length)


def length_grouped(order: Sequence[int], lengths: Sequence[int], step: int, g: torch.Generator) -> list[int]:
    """``order`` (one epoch's shuffled indices) rearranged so that each run of ``step`` items (one global batch)
    holds items of similar length: windows of ``LENGTH_WINDOW`` batches sorted by length, cut into batches, the
    full batches shuffled with ``g`` and a short last batch kept at the end (transformers' ``group_by_length``
    does the same). A batch is padded to its longest item, so this cuts the padded tokens."""
    win = step * LENGTH_WINDOW
    batches: list[list[int]] = []
    for w in range(0, len(order), win):
        part = sorted(order[w : w + win], key=lambda i: -lengths[i])
        batches += [part[b : b + step] for b in range(0, len(part), step)]
    full = [b for b in batches if len(b) == step]
    short = [i for b in batches if len(b) < step for i in b]
    return [i for k in torch.randperm(len(full), generator=g).tolist() for i in full[k]] + short


class ExampleBatches:
    """Epochs over tokenized examples, each ``{"input_ids": [...], "labels": [...]}`` of equal length (labels are
    the ids to predict at each position, ``IGNORE`` where nothing is scored, e.g. prompt tokens). A batch is
    next-token shaped: ``input_ids = ids[:-1]``, ``targets = labels[1:]``.

    The order is a fresh permutation per epoch (seeded by ``seed`` and the epoch; ``shuffle=False`` keeps file
    order). ``packing=False``: ``batch_size`` examples right-padded to the longest (pads are never attended by real
    tokens under the causal mask and never scored). ``packing=True``: examples are laid one after another into rows
    of ``max_len`` tokens; ``segment_ids`` keep attention inside each example and ``position_ids`` restart at 0 for
    each, so the loss equals the unpacked loss; an example that does not fit the rest of a row starts the next one.
    Longer examples are truncated to ``max_len + 1`` tokens. ``on_truncate`` is told how many were cut.
    """

    def __init__(self, examples: Sequence[dict[str, list[int]]], batch_size: int, max_len: int, pad_id: int = 0,
                 packing: bool = False, shuffle: bool = True, seed: int = 0, rank: int = 0, world: int = 1,
                 on_truncate: Callable[[int], None] | None = None, by_length: bool = False) -> None:
        if not examples:
            raise LMForgeError("no examples to train on")
        if batch_size < 1 or max_len < 2:
            raise LMForgeError(f"batch_size {batch_size} must be >= 1 and max_len {max_len} >= 2")
        cut = 0
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        for ex in examples:
            ids, labels = ex["input_ids"], ex["labels"]
            if len(ids) != len(labels):
                raise LMForgeError("an example's input_ids and labels differ in length")
            if len(ids) > max_len + 1:
                cut += 1
                ids, labels = ids[: max_len + 1], labels[: max_len + 1]
            self.examples.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
        if cut and on_truncate is not None:
            on_truncate(cut)
        self.batch_size, self.max_len, self.pad_id = batch_size, max_len, pad_id
        self.packing, self.shuffle, self.seed = packing, shuffle, seed
        self.by_length = by_length and not packing  # packed rows are full anyway
        self.rank, self.world = rank, world
        self.epoch, self.cursor, self.batches = 0, 0, 0
        self._order = self._permutation(0)

    # ---- order ----------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        if self.by_length:
            lengths = [len(ids) for ids, _ in self.examples]
            return np.asarray(length_grouped(order.tolist(), lengths, self.batch_size * self.world, g))
        return order.numpy()

    def _take(self) -> int:
        """Index of the next example in the stream (crossing into the next epoch when one ends)."""
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        i = int(self._order[self.cursor])
        self.cursor += 1
        return i

    def _peek_len(self) -> int:
        if self.cursor >= len(self._order):
            return len(self.examples[int(self._permutation(self.epoch + 1)[0])][0]) - 1
        return len(self.examples[int(self._order[self.cursor])][0]) - 1

    def _global_items(self) -> list[list[int]]:
        """The global batch as rows of example indices (one per row unpacked; several per row packed)."""
        rows = self.batch_size * self.world
        if not self.packing:
            return [[self._take()] for _ in range(rows)]
        out: list[list[int]] = []
        for _ in range(rows):
            row = [self._take()]
            used = len(self.examples[row[0]][0]) - 1
            while used + self._peek_len() <= self.max_len:
                used += self._peek_len()
                row.append(self._take())
            out.append(row)
        return out

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one epoch (packed: estimated from the total length)."""
        n = len(self.examples)
        if self.packing:
            tokens = sum(len(ids) - 1 for ids, _ in self.examples)
            n = max(1, -(-tokens // self.max_len))
        return max(1, -(-n // (self.batch_size * self.world)))

    # ---- collate --------------------------------------------------------------------------------
    def _collate(self, rows: list[list[int]]) -> Batch:
        width = self.max_len if self.packing else max(sum(len(self.examples[i][0]) - 1 for i in r) for r in rows)
        B = len(rows)
        x = np.full((B, width), self.pad_id, dtype=np.int64)
        y = np.full((B, width), IGNORE, dtype=np.int64)
        seg = np.zeros((B, width), dtype=np.int64)
        pos = np.zeros((B, width), dtype=np.int64)
        for b, row in enumerate(rows):
            at = 0
            for s, i in enumerate(row):
                ids, labels = self.examples[i]
                n = len(ids) - 1
                x[b, at : at + n] = ids[:-1]
                y[b, at : at + n] = labels[1:]
                seg[b, at : at + n] = s
                pos[b, at : at + n] = np.arange(n)
                at += n
            seg[b, at:] = len(row)  # padding: a segment of its own
        out: Batch = {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y)}
        if self.packing:
            out["model_kwargs"] = {"segment_ids": torch.from_numpy(seg), "position_ids": torch.from_numpy(pos)}
        return out

    # ---- BatchSource --------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        rows = self._global_items()
        self.batches += 1
        return self._collate(rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def skip(self, n: int) -> None:
        for _ in range(n):
            self._global_items()
            self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "batches": self.batches, "seed": self.seed,
                "examples": len(self.examples), "batch_size": self.batch_size, "world": self.world,
                "packing": self.packing}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        check_stream(s, {"world": self.world, "examples": len(self.examples), "batch_size": self.batch_size,
                         "packing": self.packing})
        self.seed, self.epoch, self.cursor, self.batches = s["seed"], s["epoch"], s["cursor"], s["batches"]
        self._order = self._permutation(self.epoch)

    def fixed_batches(self, n: int, seed: int) -> list[Batch]:
        """Evaluation batches over the examples in file order, each example once (a rank's share of the last
        global batch may be empty and is then left out): the first ``n`` batches, or all of them if ``n <= 0``."""
        if n <= 0:
            n = len(self.examples)
        order = list(range(len(self.examples)))
        if self.by_length and not self.shuffle:  # the same examples (the first n batches' worth), less padding
            order = sorted(order[: n * self.batch_size * self.world], key=lambda i: -len(self.examples[i][0]))
        rows: list[list[int]] = []
        while order:
            row = [order.pop(0)]
            if self.packing:
                used = len(self.examples[row[0]][0]) - 1
                while order and used + len(self.examples[order[0]][0]) - 1 <= self.max_len:
                    used += len(self.examples[order[0]][0]) - 1
                    row.append(order.pop(0))
            rows.append(row)
        g = self.batch_size * self.world
        out = []
        for start in range(0, len(rows), g):
            mine = rows[start : start + g][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if mine:
                out.append(self._collate(mine))
            if len(out) >= n:
                break
        return out
