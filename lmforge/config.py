"""ModelConfig: every model family in lmforge is one of these, fed to the one decoder in `lmforge.model`."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lmforge.errors import LMForgeError
from lmforge.yamlfile import read_yaml_file

END_IDS = "eos_token_ids"  # extra key: a source's end ids when it had several (Llama 3, Qwen2.5)
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post", "sandwich", "deepnorm")
MLPS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh", "reglu")
POSITIONS = ("learned", "rope", "alibi", "glm2d", "none")
GLM2D_KINDS = ("learned", "rotary")
ATTN_PATTERNS = ("dense", "alternating")


class ConfigFieldError(LMForgeError):
    """A config field out of its range: ``field`` (lmforge's name), ``value`` and what it must be (``rule``)."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        super().__init__(f"config field {field}={value!r}: {rule}")
        self.field, self.value, self.rule = field, value, rule


def named_as_in_file(e: ConfigFieldError, fields: dict[str, Any], source: str) -> LMForgeError:
    """``e`` as the file ``source`` says it: naming the file's own field(s) that hold the value (a transformers
    config's num_hidden_layers, not lmforge's n_layer), else lmforge's field as derived from the file."""
    def holds(v: Any) -> bool:  # (a GGUF's integers may be NumPy's)
        if isinstance(v, bool) or isinstance(e.value, bool):
            return v is e.value
        if isinstance(v, numbers.Number) and isinstance(e.value, numbers.Number):
            return v == e.value
        return type(v) is type(e.value) and v == e.value

    same = [k for k, v in fields.items() if holds(v)]
    what = f"field {' or '.join(same)}={e.value!r}" if same else f"its fields give {e.field}={e.value!r}"
    return LMForgeError(f"{source}: {what}: {e.rule}")


# Upper limits far above every published model (PaLM-540B: 118 layers, d 18,432; 10M-token contexts): beyond
# them a config is a typo, refused before anything is allocated.
LIMITS = {"vocab_size": 1 << 24, "block_size": 1 << 24, "n_layer": 1024, "n_embd": 1 << 17, "n_head": 1 << 12,
          "n_kv_head": 1 << 12, "head_dim": 1 << 12, "intermediate_size": 1 << 20, "multiple_of": 1 << 16,
          "local_window": 1 << 24}
MAX_PARAMS = 4e12
MAX_LEARNED_POSITIONS = 1 << 20


@dataclass
class ModelConfig:
    """Shape and switches of a decoder-only transformer. Defaults give a small LLaMA-like model."""

    name: str = "custom"
    family: str = "llama"
    vocab_size: int = 32000
    block_size: int = 2048  # maximum sequence length (context)
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: multi-query; else grouped-query
    head_dim: int | None = None  # None: n_embd // n_head
    # MLP
    mlp: Literal["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu", "geglu_tanh", "reglu"] = "swiglu"
    intermediate_size: int | None = None  # None: 4*d for plain MLPs, LLaMA's 2/3*4d rule for gated ones
    multiple_of: int = 256  # LLaMA rounding of the gated hidden size
    ffn_dim_multiplier: float | None = None
    # norms
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm bias
    norm_placement: Literal["pre", "post", "sandwich", "deepnorm"] = "pre"
    final_norm: bool = True
    rmsnorm_unit_offset: bool = False  # weight stored as w-1 (Gemma style); kept off for every preset
    # positions
    position: Literal["learned", "rope", "alibi", "glm2d", "none"] = "rope"
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # fraction of head_dim rotated (GPT-NeoX rotary_pct, GPT-J rotary_dim)
    rope_interleaved: bool = False  # True: rotate (x0,x1),(x2,x3).. pairs (GPT-J, GLM); False: rotate halves
    glm2d: Literal["learned", "rotary"] = "learned"  # GLM: two learned tables; ChatGLM-6B: two rotary halves
    # block
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm(x)) (GPT-J, NeoX, PaLM, Falcon)
    parallel_shared_norm: bool = True  # one norm feeds both branches (GPT-J, PaLM, Falcon-7B); False: NeoX
    # attention
    attn_pattern: Literal["dense", "alternating"] = "dense"  # GPT-3: alternate dense and locally banded layers
    local_window: int = 256
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    # biases
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    # embeddings
    tie_embeddings: bool = False
    embedding_norm: bool = False  # BLOOM: LayerNorm right after the token embedding
    embedding_grad_shrink: float = 1.0  # GLM-130B: x*a + x.detach()*(1-a); 1.0 = off
    embedding_scale: float = 1.0  # multiply token embeddings (1.0 = off)
    # DeepNorm (decoder-only): alpha = (2M)^(1/4), beta = (8M)^(-1/4), M = n_layer; None = computed
    deepnorm_alpha: float | None = None
    deepnorm_beta: float | None = None
    # regularisation and init
    dropout: float = 0.0
    init_std: float = 0.02
    scaled_residual_init: bool = True  # output projections get std / sqrt(2 * n_layer) (GPT-2)
    # tokens
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific notes (e.g. published size)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def end_ids(self) -> list[int]:
        """Every id that ends the model's generations: EOS and the source's others (``extra["eos_token_ids"]``, from
        a transformers config's list)."""
        ends = [self.eos_id, *(self.extra.get(END_IDS) or [])]
        return list(dict.fromkeys(i for i in ends if isinstance(i, int) and not isinstance(i, bool)))

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu", "geglu_tanh", "reglu")

    @property
    def hidden_size(self) -> int:
        """Width of the MLP's inner layer (per branch for gated MLPs)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if not self.gated:
            return 4 * self.n_embd
        hidden = int(2 * 4 * self.n_embd / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def rotary_dim(self) -> int:
        if self.position == "glm2d" and self.glm2d == "rotary":
            return self.head_size // 2
        dim = int(self.head_size * self.rotary_fraction)
        return dim - dim % 2

    @property
    def alpha(self) -> float:
        """DeepNorm residual scale."""
        if self.deepnorm_alpha is not None:
            return self.deepnorm_alpha
        return (2 * self.n_layer) ** 0.25

    @property
    def beta(self) -> float:
        """DeepNorm init gain."""
        if self.deepnorm_beta is not None:
            return self.deepnorm_beta
        return (8 * self.n_layer) ** -0.25

    def layer_is_local(self, layer: int) -> bool:
        """GPT-3's alternating pattern: even layers dense, odd layers locally banded."""
        return self.attn_pattern == "alternating" and layer % 2 == 1

    # ---- checks and (de)serialisation ---------------------------------------------------------
    def validate(self) -> None:
        choices = {
            "mlp": MLPS,
            "norm": NORMS,
            "norm_placement": NORM_PLACEMENTS,
            "position": POSITIONS,
            "glm2d": GLM2D_KINDS,
            "attn_pattern": ATTN_PATTERNS,
        }
        for f in fields(self):  # (annotations are strings here: from __future__ import annotations)
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise ConfigFieldError(f.name, v, "must be true or false")
            if f.type == "str" and not isinstance(v, str):
                raise ConfigFieldError(f.name, v, "must be a string")
        if not isinstance(self.extra, dict):
            raise ConfigFieldError("extra", self.extra, "must be a mapping")
        for key in ("bos_id", "eos_id", "pad_id"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigFieldError(key, v, "must be a token id (an integer >= 0) or null")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigFieldError(key, getattr(self, key), f"allowed values are {list(allowed)}")
        for key, limit in LIMITS.items():
            v = getattr(self, key)
            if v is None and key in ("n_kv_head", "head_dim", "intermediate_size"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= limit:
                raise ConfigFieldError(key, v, f"must be an integer in [1, {limit:,}]")
        for key, lo, hi, closed in (("norm_eps", 0.0, 1.0, False), ("dropout", 0.0, 1.0, True),
                                    ("rotary_fraction", 0.0, 1.0, False), ("init_std", 0.0, math.inf, True),
                                    ("rope_theta", 0.0, math.inf, False), ("embedding_grad_shrink", 0.0, 1.0, True),
                                    ("embedding_scale", 0.0, math.inf, False), ("attn_scale", 0.0, math.inf, False),
                                    ("ffn_dim_multiplier", 0.0, math.inf, False),
                                    ("deepnorm_alpha", 0.0, math.inf, False), ("deepnorm_beta", 0.0, math.inf, False)):
            v = getattr(self, key)
            if v is None and key not in ("norm_eps", "dropout", "rotary_fraction", "init_std", "rope_theta",
                                         "embedding_grad_shrink", "embedding_scale"):
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= hi and (
                v >= lo if closed else v > lo)
            if not ok or (key == "rotary_fraction" and v > 1.0):
                bound = f"[{lo:g}, {hi:g}]" if closed else f"({lo:g}, {hi:g}]"
                raise ConfigFieldError(key, v, f"must be a finite number in {bound}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise LMForgeError(f"config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise LMForgeError(f"config: n_head={self.n_head} is not divisible by n_kv_head={self.kv_heads}")
        if self.position == "rope" and self.rotary_dim == 0:
            raise LMForgeError("config: rotary_fraction leaves no dimension to rotate")
        learned = self.position == "learned" or self.position == "glm2d" and self.glm2d == "learned"
        if learned and self.block_size > MAX_LEARNED_POSITIONS:
            raise ConfigFieldError("block_size", self.block_size, f"a learned position table holds at most "
                                   f"{MAX_LEARNED_POSITIONS:,} positions")
        params = self.approx_params()
        if params > MAX_PARAMS:
            raise LMForgeError(f"config: about {params:.3g} parameters (n_layer={self.n_layer}, n_embd={self.n_embd}, "
                               f"vocab_size={self.vocab_size}), more than {MAX_PARAMS:.0e}: refusing to build it")

    def approx_params(self) -> float:
        """Parameter count from the shapes alone (weights of attention, MLP, embeddings; norms and biases left out),
        computed before anything is allocated."""
        d, hd = self.n_embd, self.head_size
        attn = d * hd * (2 * self.n_head + 2 * self.kv_heads)
        mlp = d * self.hidden_size * (3 if self.gated else 2)
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.position == "learned" or self.position == "glm2d" and self.glm2d == "learned":
            emb += self.block_size * d * (2 if self.position == "glm2d" else 1)
        return float(self.n_layer * (attn + mlp) + emb)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LMForgeError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**d)
        except LMForgeError as e:  # name the file the bad value came from
            raise LMForgeError(f"{source}: {e}") from None
        except TypeError as e:  # a value of the wrong type that validation could not even compare
            raise LMForgeError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.suffix == ".json":
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise LMForgeError(f"{path}: cannot read model config: {e}") from None
        else:
            d = read_yaml_file(path, "model config")
        if not isinstance(d, dict):
            raise LMForgeError(f"{path}: a model config must be a mapping")
        return cls.from_dict(d, source=str(path))

