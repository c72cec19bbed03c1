"""LoRA (Hu et al. 2021): a frozen linear layer W plus a trainable low-rank update, y = W x + s B A dropout(x),
s = alpha / r (rsLoRA, Kalajdzievskiy 2023: alpha / sqrt(r)). A starts kaiming-uniform (a = sqrt(5), as ``nn.Linear``
and PEFT do), B at zero, so training starts from the base model.

lmforge's attention has one fused ``qkv`` layer and gated MLPs one fused ``fc1`` = [gate | up]; a ``LoRALinear``
holds one (A, B) pair per *slice* of its output rows, so q, k, v, gate and up are chosen separately (``q`` and ``v``
only: the k rows get no update), or the whole fused layer shares one A (``qkv``, ``fc1``). Targets are named in
lmforge terms (``q k v qkv proj gate up fc1 fc2 lm_head``), in Hugging Face/PEFT terms (``q_proj``, ``o_proj``,
``gate_proj``, ``down_proj``, ``c_attn``, ``c_proj``, ``c_fc``, ``query_key_value``, ``dense``...) or as
``all-linear`` (every linear layer of the blocks, cut the way the model's transformers architecture cuts them, as
PEFT's ``all-linear`` does). The base may be an ``nn.Linear``, a ``QuantLinear`` (int8/int4) or an ``NF4Linear``
(QLoRA): quantized bases stay quantized, gradients reach the input through the dequantized weight, recomputed in
the backward pass (``quant.modules.FrozenWeightGrad``: nothing float of the base's size is kept).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from lmforge.errors import LMForgeError
from lmforge.interop.hf import _t_split, check_exportable, guess_arch  # _t_split: GPT-2's Conv1D
from lmforge.matmul import call, linear
from lmforge.model.swap import find_modules, get_module, replace_modules, set_module
from lmforge.peft.base import adapter_modules
from lmforge.quant.modules import QuantEmbedding, QuantLinear
from lmforge.quant.nf4 import NF4Linear

DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": "all-linear", "rslora": False}
SUGGESTED_LR = 1e-4  # LLaMA-Factory's LoRA examples and the QLoRA paper's largest models...
SUGGESTED_LR_PARAMS = 1.3e10  # ...at 8B-65B: 1e-4 at 13B, ~1e-3 for a 135M model (identity SFT needs it)
PEFT_TYPE = "LORA"

LM_TARGETS = ("q", "k", "v", "qkv", "proj", "gate", "up", "fc1", "fc2", "lm_head")
# Hugging Face / PEFT module names -> lmforge targets (GPT-2's c_proj is both projections, as in PEFT)
HF_TARGETS: dict[str, tuple[str, ...]] = {
    "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("proj",), "out_proj": ("proj",),
    "dense": ("proj",), "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("fc2",), "gate_up_proj": ("fc1",),
    "c_attn": ("qkv",), "c_proj": ("proj", "fc2"), "c_fc": ("fc1",), "query_key_value": ("qkv",),
    "qkv_proj": ("qkv",), "W_pack": ("qkv",), "dense_h_to_4h": ("fc1",), "dense_4h_to_h": ("fc2",),
    "fc_in": ("fc1",), "fc_out": ("fc2",), "embed_out": ("lm_head",),
}
QUANTIZED_BASES = (QuantLinear, NF4Linear)


def lora_init_(a: torch.Tensor, b: torch.Tensor) -> None:
    """PEFT's default: A kaiming-uniform with a = sqrt(5) (``nn.Linear``'s own init), B zeros."""
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


class LoRALinear(nn.Module):
    """``base`` plus one low-rank update per output slice: slices {name: (start, end, rank, scaling)}."""

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int, int, float]], dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        order = sorted(slices.items(), key=lambda kv: kv[1][0])
        for (_, (_, e, _, _)), (n2, (s2, _, _, _)) in zip(order, order[1:]):
            if s2 < e:
                raise LMForgeError(f"LoRA slices overlap at {n2!r}")
        dev = next((t.device for t in base.buffers()), None)
        dev = next((p.device for p in base.parameters()), dev)
        self.slices = {n: (s, e) for n, (s, e, _, _) in order}
        self.scaling = {n: float(sc) for n, (_, _, _, sc) in order}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for n, (s, e, r, _) in order:
            self.lora_A[n] = nn.Parameter(torch.empty(r, self.in_features, device=dev))
            self.lora_B[n] = nn.Parameter(torch.empty(e - s, r, device=dev))
            lora_init_(self.lora_A[n], self.lora_B[n])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False
        self.train(base.training)  # a model in eval mode stays in eval mode (no dropout)

    def adapter_params(self) -> list[str]:
        return [f"lora_{m}.{n}" for n in self.slices for m in "AB"]

    def extra_repr(self) -> str:
        parts = [f"{n}[{s}:{e}] r={self.lora_A[n].shape[0]} scale={self.scaling[n]:g}" for n, (s, e) in
                 self.slices.items()]
        return ", ".join(parts) + (", merged" if self.merged else "")

    def _update(self, y: torch.Tensor, x: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        pieces, pos = [], 0
        for n, (s, e) in self.slices.items():
            if s > pos:
                pieces.append(y[..., pos:s])
            a, b = self.lora_A[n], self.lora_B[n]
            d = linear(linear(x, a.to(x.dtype)), b.to(x.dtype))
            pieces.append(y[..., s:e] + (sign * self.scaling[n]) * d)
            pos = e
        if pos < self.out_features:
            pieces.append(y[..., pos:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = call(self.base, x)
        if self.merged:
            return self._update(y, x, -1.0) if self.disabled else y
        if self.disabled:
            return y
        return self._update(y, self.dropout(x))

    def delta_weight(self) -> torch.Tensor:
        """The (N, K) update s B A over all slices (zero rows outside them)."""
        a0 = next(iter(self.lora_A.values()))
        dw = torch.zeros(self.out_features, self.in_features, dtype=a0.dtype, device=a0.device)
        for n, (s, e) in self.slices.items():
            dw[s:e] = self.scaling[n] * (self.lora_B[n] @ self.lora_A[n])
        return dw

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear):
            raise LMForgeError(f"LoRA merge: the base layer is {type(self.base).__name__}, not a float linear "
                               "layer (dequantize the base first: lmforge peft merge does)")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


# ---- targets ------------------------------------------------------------------------------------


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> set[str]:
    """lmforge targets of a comma-separated (or list) spec in lmforge or HF/PEFT names; ``all-linear`` -> {"all"}."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    out: set[str] = set()
    for name in filter(None, names):
        if name in ("all-linear", "all_linear", "all"):
            out.add("all")
        elif name in LM_TARGETS:
            out.add(name)
        elif name in HF_TARGETS:
            out.update(HF_TARGETS[name])
        else:
            raise LMForgeError(f"peft.targets: unknown module {name!r}; use lmforge names {list(LM_TARGETS)}, "
                               f"HF/PEFT names such as {sorted(HF_TARGETS)[:8]}... or all-linear")
    if not out:
        raise LMForgeError("peft.targets: no module named")
    return out


def _hf_cuts(cfg) -> tuple[bool, bool]:
    """Whether the model's transformers architecture has separate q/k/v and gate/up layers."""
    try:
        arch = guess_arch(cfg)
        check_exportable(cfg, arch)
    except LMForgeError:
        return True, True
    hf = {r.lm: r.hf for r in arch.rules(cfg)}
    return len(hf.get("blocks.0.attn.qkv.weight", [])) > 1, len(hf.get("blocks.0.mlp.fc1.weight", [])) > 1


def row_slices(cfg, module: str, targets: set[str]) -> dict[str, tuple[int, int]]:
    """{slice name: (start, end)} of the rows of lmforge layer ``module`` (e.g. ``blocks.3.attn.qkv``) to adapt."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf == "qkv":
        nq, nkv = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
        parts = {"q": (0, nq), "k": (nq, nq + nkv), "v": (nq + nkv, nq + 2 * nkv)}
        if "all" in targets:
            return parts if _hf_cuts(cfg)[0] else {"qkv": (0, nq + 2 * nkv)}
        if "qkv" in targets:
            if targets & {"q", "k", "v"}:
                raise LMForgeError("peft.targets: qkv (c_attn, query_key_value) already includes q, k and v")
            return {"qkv": (0, nq + 2 * nkv)}
        return {n: p for n, p in parts.items() if n in targets}
    if leaf == "fc1":
        h = cfg.hidden_size
        if not cfg.gated:
            return {"fc1": (0, h)} if targets & {"all", "fc1", "up"} else {}
        parts = {"gate": (0, h), "up": (h, 2 * h)}
        if "all" in targets:
            return parts if _hf_cuts(cfg)[1] else {"fc1": (0, 2 * h)}
        if "fc1" in targets:
            if targets & {"gate", "up"}:
                raise LMForgeError("peft.targets: fc1 (gate_up_proj) already includes gate and up")
            return {"fc1": (0, 2 * h)}
        return {n: p for n, p in parts.items() if n in targets}
    if leaf in ("proj", "fc2"):
        return {leaf: (0, cfg.n_embd)} if targets & {"all", leaf} else {}
    if leaf == "lm_head":
        return {"lm_head": (0, cfg.vocab_size)} if "lm_head" in targets else {}
    return {}


LINEAR_LEAVES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def linear_layers(model: nn.Module) -> list[str]:
    """The decoder's adaptable layers: the blocks' qkv, proj, fc1, fc2 and lm_head (whatever their class)."""
    names = find_modules(model, lambda n, m: n.startswith("blocks.") and n.split(".", 2)[-1] in LINEAR_LEAVES)
    return names + ["lm_head"]


# ---- apply, merge ------------------------------------------------------------------------------


def resolve(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = {**DEFAULTS, **(options or {})}
    try:
        r, opts["alpha"], opts["dropout"] = float(opts["r"]), float(opts["alpha"]), float(opts["dropout"])
    except (TypeError, ValueError) as e:
        raise LMForgeError(f"peft options: {e}") from None
    if not r.is_integer():  # (2.5 trained rank 2)
        raise LMForgeError(f"peft.r {opts['r']}: the rank must be a positive integer")
    opts["r"] = int(r)
    opts["rslora"] = _bool(opts["rslora"], "rslora")
    if opts["r"] <= 0:
        raise LMForgeError(f"peft.r {opts['r']}: the rank must be positive")
    if not math.isfinite(opts["alpha"]):  # (NaN was blamed on train.lr after five rollbacks)
        raise LMForgeError(f"peft.alpha {opts['alpha']}: must be a finite number")
    if not 0 <= opts["dropout"] < 1:
        raise LMForgeError(f"peft.dropout {opts['dropout']}: must be in [0, 1)")
    if not isinstance(opts["targets"], str):
        opts["targets"] = ",".join(opts["targets"])
    parse_targets(opts["targets"])
    return opts


def _bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "yes"):
        return True
    if str(v).lower() in ("false", "0", "no"):
        return False
    raise LMForgeError(f"peft.{key} {v!r}: expected true or false")


def scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def apply(model: nn.Module, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Wrap the targeted layers of a Decoder in ``LoRALinear`` (in place); returns the resolved options."""
    opts = resolve(options)
    if adapter_modules(model):
        raise LMForgeError("LoRA: the model already has adapters")
    targets = parse_targets(opts["targets"])
    sc = scaling(opts["alpha"], opts["r"], opts["rslora"])
    plan = {}
    for name in linear_layers(model):
        sl = row_slices(model.cfg, name, targets)
        if sl:
            plan[name] = {k: (s, e, opts["r"], sc) for k, (s, e) in sl.items()}
    if not plan:
        raise LMForgeError(f"peft.targets {opts['targets']!r}: no layer of this model matches")
    room = min(min(get_module(model, n).in_features, get_module(model, n).out_features) for n in plan)
    if opts["r"] > room:  # a rank above min(in, out) adds nothing; 100000 allocated until memory ran out
        raise LMForgeError(f"peft.r {opts['r']}: larger than the adapted layers allow (min(in, out) = {room}: a "
                           "higher rank adds nothing)")
    replace_modules(model, plan, lambda n, old: LoRALinear(old, plan[n], opts["dropout"]))
    return opts


def wrap(model: nn.Module, name: str, slices: dict[str, tuple[int, int, int, float]], dropout: float) -> LoRALinear:
    """Wrap one layer (used when loading adapters whose ranks or scalings differ per layer)."""
    old = get_module(model, name)
    if isinstance(old, LoRALinear):
        raise LMForgeError(f"LoRA: {name} is already adapted")
    new = LoRALinear(old, slices, dropout)
    set_module(model, name, new)
    return new


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def untie_head(model: nn.Module) -> None:
    """Give an adapted, tied ``lm_head`` its own copy of the weight (merging must not change the embedding)."""
    head = model.lm_head
    if isinstance(head, LoRALinear) and isinstance(head.base, nn.Linear) and hasattr(model.wte, "weight") \
            and head.base.weight is model.wte.weight:
        head.base.weight = nn.Parameter(head.base.weight.detach().clone(), requires_grad=False)
        model.cfg.tie_embeddings = False


def merge_adapter(model: nn.Module) -> None:
    """Add every LoRA update into its base weight (forward unchanged, no extra compute). A tied lm_head is untied."""
    untie_head(model)
    for m in lora_layers(model).values():
        m.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def _float_linear(q: nn.Module) -> nn.Linear:
    w = q.dequantize()
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        if q.bias is not None:
            lin.bias.copy_(q.bias)
    return lin.requires_grad_(False).train(q.training)


def dequantize_bases(model: nn.Module) -> None:
    """Every quantized layer of ``model`` (under LoRA or not: ``QuantLinear``, ``NF4Linear``, ``QuantEmbedding``)
    back to float32 modules holding the dequantized weights: the model computes what it computed, in float."""
    head = getattr(model, "lm_head", None)
    head = head.base if isinstance(head, LoRALinear) else head
    wte = getattr(model, "wte", None)
    tied = isinstance(head, QuantLinear) and isinstance(wte, QuantEmbedding) and head.qweight is wte.qweight
    replace_modules(model, find_modules(model, lambda n, m: isinstance(m, QUANTIZED_BASES)),
                    lambda n, q: _float_linear(q))
    if isinstance(getattr(model, "wte", None), QuantEmbedding):
        q = model.wte
        emb = nn.Embedding(q.num_embeddings, q.embedding_dim, device=q.qweight.device).requires_grad_(False)
        with torch.no_grad():
            emb.weight.copy_(q.dequantize())
        model.wte = emb
        if tied:
            head = model.lm_head.base if isinstance(model.lm_head, LoRALinear) else model.lm_head
            head.weight = emb.weight  # tied again, as the float model was
    if hasattr(model, "quant_config"):
        del model.quant_config


def unwrap(model: nn.Module) -> None:
    """Merge every LoRA layer and put its base layer back in its place: a plain Decoder again."""
    dequantize_bases(model)
    merge_adapter(model)
    for name, m in lora_layers(model).items():
        set_module(model, name, m.base)


# ---- PEFT's format --------------------------------------------------------------------------------
# PEFT names each adapted module as transformers does: base_model.model.<HF module>.lora_A.weight (r, K) and
# .lora_B.weight (N_hf, r). lmforge's interop rule table (interop/hf.py) says which HF tensors make up each lmforge
# layer and how its rows are cut (q/k/v of qkv, gate/up of fc1, per-head interleaving for NeoX/BLOOM/Falcon, the
# transposed Conv1D of GPT-2: its rows are unchanged, PEFT sets fan_in_fan_out). A lmforge slice spanning several HF
# modules exports as one (A, B) per module (the same A, B cut by rows: exact); several slices inside one HF module
# (q and v of GPT-2's c_attn) stack their ranks, with rank_pattern/alpha_pattern keeping each scaling.

PREFIX = "base_model.model."


def _row_maps(cfg) -> tuple[dict[str, list[tuple[str, torch.Tensor]]], bool]:
    """{lmforge layer: [(HF module, lmforge row indices of its rows)]} and whether HF uses Conv1D (fan_in_fan_out)."""
    arch = guess_arch(cfg)
    check_exportable(cfg, arch)
    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    conv = False
    for r in arch.rules(cfg):
        if not r.lm.endswith(".weight") or r.lm.split(".")[-2] not in ("qkv", "proj", "fc1", "fc2", "lm_head"):
            continue
        layer = r.lm[: -len(".weight")]
        n = cfg.vocab_size if layer == "lm_head" else get_out(cfg, layer)
        idx = torch.arange(n)[:, None]
        if r.split is _t_split:
            conv = True
            parts = [idx.view(-1)]
        else:
            parts = [p.reshape(-1) for p in r.split(idx)]
        out[layer] = [(h[: -len(".weight")], p) for h, p in zip(r.hf, parts)]
    if "lm_head" not in out:  # tied: transformers still has the module
        out["lm_head"] = [("embed_out" if arch.model_type == "gpt_neox" else "lm_head", torch.arange(cfg.vocab_size))]
    return out, conv


def get_out(cfg, layer: str) -> int:
    leaf = layer.rsplit(".", 1)[-1]
    if leaf == "qkv":
        return (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_size
    if leaf == "fc1":
        return cfg.hidden_size * (2 if cfg.gated else 1)
    return cfg.n_embd


def _peft_alpha(scale: float, r: int, rslora: bool) -> float:
    return scale * (math.sqrt(r) if rslora else r)


def to_peft(model: nn.Module, resolved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, tensors) in PEFT's LoRA format for the transformers export of the base."""
    try:
        maps, conv = _row_maps(model.cfg)
    except LMForgeError as e:
        raise LMForgeError(f"PEFT format: the base has no transformers equivalent ({e})") from None
    r0, a0, rs = int(resolved["r"]), float(resolved["alpha"]), bool(resolved.get("rslora", False))
    s0 = scaling(a0, r0, rs)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    chosen: list[str] = []
    for name, m in lora_layers(model).items():
        for hf_mod, idx in maps[name]:
            parts = [(n, s, e) for n, (s, e) in m.slices.items() if bool(((idx >= s) & (idx < e)).any())]
            if not parts:
                continue
            ranks = [m.lora_A[n].shape[0] for n, _, _ in parts]
            rr, sc = sum(ranks), m.scaling[parts[0][0]]
            a = torch.cat([m.lora_A[n].detach() for n, _, _ in parts]).float()
            b = torch.zeros(len(idx), rr)
            off = 0
            for (n, s, e), rk in zip(parts, ranks):
                mask = (idx >= s) & (idx < e)
                b[mask, off:off + rk] = m.lora_B[n].detach().float()[idx[mask] - s] * (m.scaling[n] / sc)
                off += rk
            alpha = _peft_alpha(sc, rr, rs)
            if rr != r0:
                rank_pattern[hf_mod] = rr
            if rr != r0 or not math.isclose(sc, s0, rel_tol=1e-9):
                alpha_pattern[hf_mod] = alpha
            tensors[f"{PREFIX}{hf_mod}.lora_A.weight"] = a.contiguous()
            tensors[f"{PREFIX}{hf_mod}.lora_B.weight"] = b.contiguous()
            chosen.append(hf_mod)
    every = [h for lst in maps.values() for h, _ in lst]
    targets: list[str] = []
    for h in chosen:
        leaf = h.rsplit(".", 1)[-1]
        same = [x for x in every if x.rsplit(".", 1)[-1] == leaf]
        t = leaf if set(same) <= set(chosen) else h
        if t not in targets:
            targets.append(t)
    config = {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "r": r0, "lora_alpha": a0,
        "lora_dropout": float(resolved.get("dropout", 0.0)), "use_rslora": rs, "target_modules": targets,
        "fan_in_fan_out": conv, "bias": "none", "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True, "use_dora": False,
    }
    return config, tensors


def _slice_name(cfg, layer: str, s: int, e: int) -> str:
    leaf = layer.rsplit(".", 1)[-1]
    known = {}
    if leaf == "qkv":
        nq, nkv = cfg.n_head * cfg.head_size, cfg.kv_heads * cfg.head_size
        known = {(0, nq): "q", (nq, nq + nkv): "k", (nq + nkv, nq + 2 * nkv): "v", (0, nq + 2 * nkv): "qkv"}
    elif leaf == "fc1" and cfg.gated:
        h = cfg.hidden_size
        known = {(0, h): "gate", (h, 2 * h): "up", (0, 2 * h): "fc1"}
    elif e - s == get_out(cfg, layer) or leaf == "lm_head":
        known = {(s, e): leaf}
    return known.get((s, e), f"{leaf}_{s}_{e}")


def _same_base_copy(model: nn.Module, where: tuple[str, torch.Tensor], key: str, t: torch.Tensor) -> None:
    """A copy of a base layer's weight, which ``peft`` saves beside a LoRA of an output or embedding layer
    (``save_embedding_layers``, on by default then): taken when it is the base's, refused when it was changed."""
    layer, idx = where
    w = get_module(model, layer).weight
    if t.shape != (len(idx), w.shape[1]) or not torch.equal(t.to(w.dtype), w.detach()[idx.to(w.device)].cpu()):
        raise LMForgeError(f"adapter_model.safetensors: tensor {key!r} is a changed copy of the base's {layer} "
                           "weight (peft's save_embedding_layers, e.g. after resizing the vocabulary); lmforge applies "
                           "LoRA weights to the base as it is")


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return default


def _check_peft_numbers(c: dict[str, Any]) -> None:
    """A PEFT LoRA config's ranks, alphas and dropout: in range (a NaN alpha merged into NaN weights, exit 0)."""
    def number(key: str, v: Any, integer: bool = False) -> float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if integer and not (ok and v == int(v) and v >= 1):
            raise LMForgeError(f"adapter_config.json: {key}={v!r}: must be an integer >= 1")
        if not ok:
            raise LMForgeError(f"adapter_config.json: {key}={v!r}: must be a finite number")
        return float(v)

    number("r", c.get("r", 8), integer=True)
    number("lora_alpha", c.get("lora_alpha", 8))
    if not 0 <= number("lora_dropout", c.get("lora_dropout", 0.0)) < 1:
        raise LMForgeError(f"adapter_config.json: lora_dropout={c.get('lora_dropout')!r}: must be in [0, 1)")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pats = c.get(key) or {}
        if not isinstance(pats, dict):
            raise LMForgeError(f"adapter_config.json: {key}={pats!r}: must be a mapping of module patterns")
        for k, v in pats.items():
            number(f"{key}[{k!r}]", v, integer)
    tm = c.get("target_modules")
    if tm is not None and not isinstance(tm, str) and not (
            isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        raise LMForgeError(f"adapter_config.json: target_modules={tm!r}: must be a list of module names or a regex")


def _targeted(module: str, targets: str | list[str] | None) -> bool:
    """PEFT's matching of ``target_modules``: a string is a regular expression of the whole name, a list names
    modules by their full name or its last parts; none (an older config): every module is."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


class NoHFLayout(LMForgeError):
    """A PEFT-format adapter met a base model that has no transformers layout (its module names do not apply)."""


def from_peft(model: nn.Module, adapter_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Apply a PEFT LoRA adapter (made by lmforge or by ``peft``) to a Decoder and load its weights."""
    c = adapter_config
    if c.get("peft_type") != PEFT_TYPE:
        raise LMForgeError(f"adapter_config.json: peft_type={c.get('peft_type')!r}, expected {PEFT_TYPE!r}")
    for key, ok in (("use_dora", (False, None)), ("bias", ("none", None)), ("modules_to_save", (None, [])),
                    ("lora_bias", (False, None))):
        if c.get(key) not in ok:
            raise LMForgeError(f"adapter_config.json: {key}={c.get(key)!r} is not supported by lmforge's LoRA")
    _check_peft_numbers(c)
    rs, r0, a0 = bool(c.get("use_rslora", False)), int(c.get("r", 8)), float(c.get("lora_alpha", 8))
    try:
        maps, _ = _row_maps(model.cfg)
    except LMForgeError as e:
        raise NoHFLayout(f"a PEFT-format adapter names the modules of a transformers model, and the base has no "
                         f"transformers layout ({e})") from None
    where = {h: (layer, idx) for layer, lst in maps.items() for h, idx in lst}
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        body = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if body.endswith(".base_layer.weight") and body[: -len(".base_layer.weight")] in where:
            _same_base_copy(model, where[body[: -len(".base_layer.weight")]], k, t)
            continue
        for kind in ("lora_A", "lora_B"):
            for suffix in (f".{kind}.weight", f".{kind}.default.weight"):
                if body.endswith(suffix):
                    mods.setdefault(body[: -len(suffix)], {})[kind] = t
                    break
            else:
                continue
            break
        else:
            raise LMForgeError(f"adapter_model.safetensors: tensor {k!r} is not a LoRA weight lmforge knows")
    plan: dict[str, dict[str, tuple]] = {}
    for hf_mod, ab in mods.items():
        if hf_mod not in where:
            raise LMForgeError(f"adapter_model.safetensors: module {hf_mod!r} is not a linear layer of this base")
        if set(ab) != {"lora_A", "lora_B"}:
            raise LMForgeError(f"adapter_model.safetensors: module {hf_mod!r} lacks lora_A or lora_B")
        if not _targeted(hf_mod, c.get("target_modules")):
            raise LMForgeError(f"adapter_config.json: target_modules={c.get('target_modules')!r} does not name "
                               f"{hf_mod}, which holds LoRA weights (PEFT would leave them out)")
        layer, idx = where[hf_mod]
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        r = a.shape[0]
        if r != int(_pattern(c.get("rank_pattern"), hf_mod, r0)):
            raise LMForgeError(f"adapter_model.safetensors: {hf_mod}'s lora_A has rank {r}; adapter_config.json "
                               f"says r={_pattern(c.get('rank_pattern'), hf_mod, r0)} (PEFT would not load it)")
        if b.shape != (len(idx), r) or a.shape[1] != get_module(model, layer).in_features:
            raise LMForgeError(f"adapter_model.safetensors: {hf_mod} has lora_A {tuple(a.shape)}, lora_B "
                               f"{tuple(b.shape)}; the base needs ({r}, {get_module(model, layer).in_features}) "
                               f"and ({len(idx)}, {r})")
        s, e = int(idx.min()), int(idx.max()) + 1
        if e - s != len(idx):
            raise LMForgeError(f"adapter: {hf_mod} maps to non-contiguous rows of {layer}")
        bl = torch.zeros(e - s, r)
        bl[idx - s] = b
        alpha = float(_pattern(c.get("alpha_pattern"), hf_mod, a0))
        plan.setdefault(layer, {})[_slice_name(model.cfg, layer, s, e)] = (s, e, r, scaling(alpha, r, rs), a, bl)
    dropout = float(c.get("lora_dropout", 0.0))
    names = set()
    for layer, sl in plan.items():
        m = wrap(model, layer, {n: v[:4] for n, v in sl.items()}, dropout)
        with torch.no_grad():
            for n, v in sl.items():
                m.lora_A[n].copy_(v[4])
                m.lora_B[n].copy_(v[5])
        names.update(n if n in LM_TARGETS else layer.rsplit(".", 1)[-1] for n in sl)
    return {"r": r0, "alpha": a0, "dropout": dropout, "rslora": rs,
            "targets": ",".join(t for t in LM_TARGETS if t in names)}
