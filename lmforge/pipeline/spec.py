"""A pipeline as data: the YAML file read into stages, each one lmforge command with its flags, its inputs
resolved (``builtin:NAME``, a path, or ``{from: STAGE}``, an earlier stage's output) and a hash of its config and
inputs that decides whether its output can be reused.

The YAML::

    out: runs/pipeline            # the run directory (--out overrides)
    base: PATH                    # optional: start from this model; tokenizer/clean/prepare/pretrain are dropped
    measure: {...}                # what is measured after every stage that changes the model (see MeasureConfig)
    stages:
      - tokenizer: {input: builtin:stories_corpus, vocab-size: 1024, kind: llama-bpe}
      - sft: {model: {from: pretrain}, data: builtin:stories_instruct, train: {lr: 1e-3}}
      - dpo: {name: dpo-strong, model: {from: sft}, beta: 0.5}     # `name` when a command runs twice

Each stage is ``COMMAND: {flags}``: the flags of ``lmforge COMMAND --help`` without dashes (``vocab-size`` or
``vocab_size``), nested mappings for ``--section.key`` overrides (``train: {lr: 1e-3}`` is ``--train.lr 1e-3``),
``inputs`` for positional arguments, ``true`` for a switch. The stage's output flag is set by the pipeline (a stage
giving it is refused). Every stage's flags are parsed by its command, and its config checked, before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.assets import builtin_path
from lmforge.cli import parse_command
from lmforge.commands.common import Planned
from lmforge.errors import LMForgeError
from lmforge.files import read_utf8
from lmforge.train.config import coerce
from lmforge.yamlfile import key_at, parse_yaml


@dataclass(frozen=True)
class Kind:
    """What the pipeline needs to know of a command: its argv prefix, the flag naming its output, where in the
    stage directory the product is (``""`` = the directory itself), whether it trains (resumable with --resume) and
    whether its product is a new policy (measured after the stage)."""

    command: tuple[str, ...]
    output_flag: str
    product: str = ""
    output: str = ""  # the output flag's value inside the stage directory ("" = the directory)
    trains: bool = False
    policy: bool = False
    help: str = ""
    parallel: bool = True  # a training stage every torchrun process runs (data parallel); else the first only


KINDS: dict[str, Kind] = {
    "tokenizer": Kind(("tokenizer", "train"), "--output", help="train a tokenizer (lmforge tokenizer train)"),
    "clean": Kind(("data", "clean"), "--output", "clean.jsonl", "clean.jsonl",
                  help="clean and de-duplicate a corpus (lmforge data clean); also writes report.json"),
    "prepare": Kind(("data", "prepare"), "--output", help="tokenize into train/val shards (lmforge data prepare)"),
    "pretrain": Kind(("pretrain",), "--out", "best", trains=True, policy=True,
                     help="pretrain a model (lmforge pretrain); product: its best checkpoint"),
    "sft": Kind(("sft",), "--out", trains=True, policy=True, help="instruction tuning, full or PEFT (lmforge sft)"),
    "reward": Kind(("reward",), "--out", trains=True, help="train a reward model (lmforge reward)"),
    "dpo": Kind(("dpo",), "--out", trains=True, policy=True, help="direct preference optimisation (lmforge dpo)"),
    "ppo": Kind(("ppo",), "--out", trains=True, policy=True, parallel=False, help="RLHF with PPO (lmforge ppo)"),
    "rejection-sample": Kind(("rejection-sample",), "--out", "samples.jsonl", "samples.jsonl",
                             help="best-of-K samples by a reward model as SFT data (lmforge rejection-sample)"),
    "eval": Kind(("eval",), "--output", "results.json", "results.json", help="any lmforge eval task (lmforge eval)"),
    "quantize": Kind(("quantize",), "--output", policy=True, help="int8/int4 weights (lmforge quantize)"),
    "merge": Kind(("peft", "merge"), "--output", policy=True,
                  help="fold a LoRA adapter into its base (lmforge peft merge)"),
}
PRETRAINING = ("tokenizer", "clean", "prepare", "pretrain")  # dropped when the pipeline names a `base` model
RESERVED = ("name", "measure")  # stage keys that are not command flags


@dataclass
class MeasureConfig:
    """Measured on every policy before and after each stage that changes it (``measure:`` in the YAML).

    prompts: held-out instructions (a text file, one per line, or JSONL with prompt/instruction/messages);
    text: held-out text for perplexity; follow: ``module:function(instruction, response) -> bool``, the rate at
    which responses follow the instruction; preference: ``module:function(prompts, responses) -> list[float]``,
    the preference the alignment stages optimise; samples: responses shown in the report per stage;
    max_new_tokens: response length; kl_max: the bound the alignment stages' KL from their start must keep (nats
    per response); ppl_tolerance: how much quantization may raise the perplexity (relative); tasks: any
    ``lmforge eval`` tasks (``[{task: arc, data: arc.jsonl, limit: 200}]``), logged as ``TASK_METRIC``."""

    prompts: str | None = "builtin:stories_heldout_prompts"
    text: str | None = "builtin:stories_heldout"
    follow: str | None = "lmforge.data.stories:follows"
    preference: str | None = "lmforge.data.stories:story_reward"
    samples: int = 4
    max_new_tokens: int = 48
    kl_max: float = 10.0
    ppl_tolerance: float = 0.05
    context: int = 0  # perplexity window (0: the model's context)
    tasks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stage:
    name: str
    kind: str
    args: dict[tuple[str, ...], Any]  # flag path -> value (a value may be a Ref)
    line: int = 0  # where it is in the YAML (for errors)
    measure: bool = True

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    def where(self, source: str) -> str:
        """``FILE:LINE`` of the stage in its YAML, for errors."""
        return f"{source}:{self.line}" if self.line else f"{source}: stage {self.name}"

    def pipeline_flags(self) -> tuple[str, ...]:
        """Flags the pipeline sets itself (the stage's output), which a stage may not give."""
        own = (self.spec.output_flag.lstrip("-"),)
        return own + ("report", "overwrite") if self.kind == "clean" else own


@dataclass(frozen=True)
class Ref:
    """``{from: STAGE}``: the product of an earlier stage."""

    stage: str


@dataclass
class Pipeline:
    stages: list[Stage]
    out: str = "runs/pipeline"
    base: str | None = None
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    source: str = "built-in default"

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise LMForgeError(f"no stage {name!r} in {self.source}; stages: {', '.join(s.name for s in self.stages)}")


def _is_ref(v: Any) -> bool:
    return isinstance(v, dict) and set(v) == {"from"}


def _flatten(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in d.items():
        path = prefix + tuple(str(k).split("."))
        if _is_ref(v):
            out[path] = Ref(str(v["from"]))
        elif isinstance(v, list):
            out[path] = [Ref(str(x["from"])) if _is_ref(x) else x for x in v]
        elif isinstance(v, dict):
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def _stage_lines(text: str) -> list[int]:
    """Line number (1-based) of each item of the top-level ``stages`` list."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.MappingNode):
        return []
    for k, v in node.value:
        if k.value == "stages" and isinstance(v, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in v.value]
    return []


def parse_pipeline(d: dict[str, Any], source: str, text: str = "") -> Pipeline:
    """A pipeline from its YAML mapping; errors name ``source:line`` and the stage."""
    lines = _stage_lines(text) if text else []
    unknown = sorted(set(d) - {"out", "base", "measure", "stages", "name", "description"})
    if unknown:
        raise LMForgeError(f"{source}: unknown key {unknown[0]!r}; known: base, measure, out, stages")
    items = d.get("stages")
    if not isinstance(items, list) or not items:
        raise LMForgeError(f"{source}: 'stages' must be a non-empty list of COMMAND: {{flags}} items")
    measure = MeasureConfig()
    if not isinstance(d.get("measure") or {}, dict):
        raise LMForgeError(f"{key_at(d, 'measure') or source}: measure: expected a mapping of settings")
    hints = typing.get_type_hints(MeasureConfig)
    for k, v in (d.get("measure") or {}).items():
        if k not in MeasureConfig.__dataclass_fields__:
            known = ", ".join(MeasureConfig.__dataclass_fields__)
            raise LMForgeError(f"{source}: measure.{k}: unknown; known: {known}")
        setattr(measure, k, coerce(v, hints[k], f"{key_at(d['measure'], k) or source}: measure.{k}"))
    stages: list[Stage] = []
    for i, item in enumerate(items):
        where = f"{source}:{lines[i]}" if i < len(lines) else f"{source}: stages[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise LMForgeError(f"{where}: a stage is one COMMAND: {{flags}} mapping; commands: {', '.join(KINDS)}")
        kind, flags = next(iter(item.items()))
        if kind not in KINDS:
            raise LMForgeError(f"{where}: unknown stage command {kind!r}; known: {', '.join(KINDS)}")
        if not isinstance(flags if flags is not None else {}, dict):
            raise LMForgeError(f"{where}: {kind}: expected a mapping of flags, got {flags!r}")
        flags = dict(flags or {})
        name = str(flags.pop("name", kind))
        do_measure = bool(flags.pop("measure", True))
        if any(s.name == name for s in stages):
            raise LMForgeError(f"{where}: a second stage named {name!r}; give it `name: OTHER`")
        args = _flatten(flags)
        for path in args:
            _check_not_own(Stage(name, kind, {}), path, where)
        for path, v in args.items():
            for ref in v if isinstance(v, list) else [v]:
                if isinstance(ref, Ref) and not any(s.name == ref.stage for s in stages) and not (
                        d.get("base") and ref.stage in PRETRAINING):
                    raise LMForgeError(f"{where}: {'.'.join(path)}: from: {ref.stage!r} is not an earlier stage")
        stages.append(Stage(name, kind, args, lines[i] if i < len(lines) else 0, do_measure))
    p = Pipeline(stages, str(d.get("out") or "runs/pipeline"), d.get("base"), measure, source)
    if p.base:
        p.stages = [s for s in p.stages if s.kind not in PRETRAINING]
    return p


def read_pipeline(path: str | Path) -> Pipeline:
    path = Path(path)
    text = read_utf8(path, "pipeline")
    d = parse_yaml(text, str(path)) or {}
    if not isinstance(d, dict):
        raise LMForgeError(f"{path}: a pipeline is a mapping with a 'stages' list")
    return parse_pipeline(d, str(path), text)


def apply_overrides(p: Pipeline, overrides: dict[str, Any]) -> None:
    """``--STAGE.flag value`` / ``--STAGE.section.key value`` / ``--measure.key value`` / ``--base PATH``."""
    for key, value in _flatten(overrides).items():
        head, rest = key[0], key[1:]
        if head == "measure" and len(rest) == 1 and rest[0] in MeasureConfig.__dataclass_fields__:
            hint = typing.get_type_hints(MeasureConfig)[rest[0]]
            setattr(p.measure, rest[0], coerce(value, hint, f"--measure.{rest[0]}"))
        elif head == "base" and not rest:
            p.base = str(value)
            p.stages = [s for s in p.stages if s.kind not in PRETRAINING]
        elif not rest:
            raise LMForgeError(f"--{head}: expected --STAGE.flag VALUE (stages: {', '.join(s.name for s in p.stages)})")
        else:
            stage = p.stage(head)
            rest = (rest[0].replace("_", "-"),) + rest[1:] if len(rest) == 1 else rest
            _check_not_own(stage, rest, f"--{'.'.join(key)}")
            for k in list(stage.args):  # --sft.max_iters replaces max-iters
                if _norm(k) == _norm(rest):
                    del stage.args[k]
            stage.args[rest] = value


def _check_not_own(stage: Stage, path: tuple[str, ...], where: str) -> None:
    if len(path) == 1 and path[0].replace("_", "-") in stage.pipeline_flags():
        raise LMForgeError(f"{where}: {stage.kind}: {path[0]}: set by the pipeline (the stage writes into "
                           f"OUT/{stage.name}); remove it, or use --out for the run directory")


def check_flags(p: Pipeline) -> None:
    """Every stage's flags parsed by its command's own parser, before anything runs: an unknown flag or a value of
    the wrong type is refused naming the stage's line (``{from: X}`` inputs stand in as placeholder paths)."""
    products = {s.name: Path(p.out) / s.name for s in p.stages}
    for st in p.stages:
        try:
            argv = stage_argv(st, products, p.base or "BASE", Path(p.out) / st.name)
            args = parse_command(argv, strict=True)
            if getattr(args, "accepts_overrides", False):  # the training commands: their config read and checked
                args.plan_only = True
                try:
                    args.func(args)
                except Planned:
                    pass
        except LMForgeError as e:
            raise LMForgeError(f"{st.where(p.source)}: {st.kind}: {str(e).removeprefix('command line: ')} (see lmforge "
                               f"{' '.join(st.spec.command)} --help)") from None


def _norm(path: tuple[str, ...]) -> tuple[str, ...]:
    return (path[0].replace("_", "-"),) + path[1:] if len(path) == 1 else path


def resolve_value(v: Any, products: dict[str, Path], base: str | None) -> Any:
    """A flag value with ``{from: X}`` and ``builtin:NAME`` replaced by paths (also inside comma lists)."""
    if isinstance(v, Ref):
        if v.stage in products:
            return str(products[v.stage])
        if base and v.stage in PRETRAINING:
            return os.path.expanduser(base)
        raise LMForgeError(f"from: {v.stage!r}: that stage is not complete (run the pipeline without --only, or "
                           f"--only {v.stage} first)")
    if isinstance(v, list):
        return [resolve_value(x, products, base) for x in v]
    if isinstance(v, str) and "builtin:" in v:
        return ",".join(str(builtin_path(x, "builtin")) if x.startswith("builtin:") else x for x in v.split(","))
    return v


def stage_argv(stage: Stage, products: dict[str, Path], base: str | None, out: Path) -> list[str]:
    """``lmforge`` argv of a stage: its command, positional inputs, flags, overrides and output flag."""
    argv = list(stage.spec.command)
    flags: list[str] = []
    for path, raw in stage.args.items():
        v = resolve_value(raw, products, base)
        if path == ("inputs",):
            argv += [str(x) for x in (v if isinstance(v, list) else [v])]
            continue
        if len(path) == 1:
            flag = "--" + path[0].replace("_", "-")
            if v is True:
                flags.append(flag)
            elif v is False or v is None:
                continue
            elif isinstance(v, list):
                flags += [flag, *map(str, v)]
            else:
                flags += [flag, str(v)]
        else:
            flags += ["--" + ".".join(path), v if isinstance(v, str) else json.dumps(v)]
    argv += flags + [stage.spec.output_flag, str(out / stage.spec.output if stage.spec.output else out)]
    if stage.kind == "clean":
        argv += ["--report", str(out / "report.json"), "--overwrite"]
    return argv


def _fingerprint(path: Path) -> Any:
    """What a stage's input file counts as: its content hash up to 64 MB (so a file written again with the same
    bytes does not invalidate anything), else size and modification time; a directory: each file's size and time."""
    if path.is_file():
        st = path.stat()
        if st.st_size <= 64 * 2**20:
            return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return [st.st_size, st.st_mtime_ns]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())[:2000]
        return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return None


def _file_ident(v: Any) -> Any:
    """A value naming a file (``builtin:NAME`` or an existing path) as the file's path and content fingerprint."""
    if isinstance(v, str) and (v.startswith("builtin:") or Path(v).exists()):
        try:
            return {"path": v, "fp": _fingerprint(builtin_path(v) if v.startswith("builtin:") else Path(v))}
        except LMForgeError:
            return v
    return v


def measure_hash(m: MeasureConfig) -> str:
    """Hash of the measurement settings, files by their content: measurements taken otherwise are taken again."""
    blob = json.dumps({k: _file_ident(v) for k, v in dataclasses.asdict(m).items()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_hash(stage: Stage, upstream: dict[str, str], base: str | None) -> str:
    """Hash of the stage's command, flags and inputs: an upstream stage counts by its own hash, a file by its content
    (see ``_fingerprint``), so changing anything a stage reads invalidates it and every stage after it."""

    def ident(v: Any) -> Any:
        if isinstance(v, list):
            return [ident(x) for x in v]
        if isinstance(v, Ref):
            return {"from": v.stage, "hash": upstream.get(v.stage) or _base_id(base)}
        if isinstance(v, str) and "," in v and "builtin:" in v:  # a comma list of files
            return [ident(x) for x in v.split(",")]
        return _file_ident(v)

    items = [[list(path), ident(v)] for path, v in sorted(stage.args.items(), key=lambda kv: kv[0])]
    blob = json.dumps({"kind": stage.kind, "args": items}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _base_id(base: str | None) -> Any:
    """A base model counts by its path and fingerprint."""
    return [base, _fingerprint(Path(os.path.expanduser(base)))] if base else None
