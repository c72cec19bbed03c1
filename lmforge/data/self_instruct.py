"""Self-Instruct (Wang et al. 2022, arXiv:2212.10560): a model writes its own instruction data from a few seed tasks.

A run repeats rounds until ``num`` new instructions are kept:

1. instruction generation: each prompt lists 8 instructions (6 human seeds + 2 machine-generated ones when there
   are any), numbered ``1.`` .. ``8.``, and ends at ``9.``; the numbered continuation is split into candidates;
2. filters: 3..150 words, no keyword of the paper's blacklist (image, graph, file, map, draw, plot, go to, ...),
   not "Write a program", not starting with punctuation or a non-ASCII character, ROUGE-L F1 below 0.7 against
   every seed and every kept instruction;
3. classification identification: a few-shot "Is it classification? Yes/No" prompt made of labelled seeds;
4. instance generation: output-first for classification tasks (``Class label: ... Input: ...``), input-first
   otherwise (``Input: ... Output: ...``), few-shot with seed tasks of the same kind;
5. instance filters: empty output, input equal to output, incomplete (ends with ``:``), duplicates, inputs with
   conflicting outputs, more than ``max_instances`` per task.

Prompts are raw completion text (as in the paper), also for chat models. Everything that does not touch a model is
a pure function here (prompts, parsing, filters, ROUGE-L); ``run_self_instruct`` drives the rounds through a
``Backend`` (``ModelBackend`` wraps the batched KV-cache generator; tests pass a fake). Outputs in ``out``:
``machine_instructions.jsonl`` (one line per kept instruction, appended after each round), ``data.json`` (Alpaca
``[{instruction, input, output}]``) and ``report.json`` (counts per filter), both written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import string
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from lmforge.assets import STORIES260K
from lmforge.data.io import iter_records
from lmforge.errors import LMForgeError
from lmforge.files import write_text_atomic
from lmforge.infer.generate import generate_batch
from lmforge.infer.sampling import SamplingParams, cut_at_stop
from lmforge.manifest import sha256_file
from lmforge.train.loop import same_setting, write_json

DEFAULT_NAMES = {"stories260K", str(STORIES260K)}  # the default model, as an earlier lmforge recorded it too

# ---- ROUGE-L ------------------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


def rouge_tokenize(text: str, stem: Callable[[str], str] | None = None) -> list[str]:
    """Tokens as ``rouge_score``'s default tokenizer makes them: lowercase, every run of characters other than
    a-z0-9 is a separator; ``stem`` (e.g. a Porter stemmer's ``stem``) applies to tokens longer than 3 characters."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split(" ")
    if stem is not None:
        tokens = [stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if _VALID_TOKEN.match(t)]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel: one big-int step per token of
    ``b``, Hyyro 2004)."""
    return _lcs_bits(_match_masks(a), len(a), b)


def _match_masks(tokens: list[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, t in enumerate(tokens):
        masks[t] = masks.get(t, 0) | (1 << i)
    return masks


def _lcs_bits(masks: dict[str, int], m: int, b: list[str]) -> int:
    full = (1 << m) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        if u:
            v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def _f1(lcs: int, n_target: int, n_prediction: int) -> float:
    """ROUGE-L F1 from the LCS length, with rouge_score's operations (so the floats agree bit for bit)."""
    if not n_target or not n_prediction:
        return 0.0
    precision, recall = lcs / n_prediction, lcs / n_target
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(target: str, prediction: str, stem: Callable[[str], str] | None = None) -> float:
    """ROUGE-L F1 of two texts, equal to ``RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure``."""
    t, p = rouge_tokenize(target, stem), rouge_tokenize(prediction, stem)
    return _f1(lcs_length(t, p) if t and p else 0, len(t), len(p))


class RougeIndex:
    """Texts tokenized once, with their match bitmasks, so one text scores against all of them in O(len) big-int
    steps per text."""

    def __init__(self, texts: Iterable[str] = (), stem: Callable[[str], str] | None = None) -> None:
        self.stem = stem
        self.texts: list[str] = []
        self._entries: list[tuple[dict[str, int], int]] = []
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        tokens = rouge_tokenize(text, self.stem)
        self.texts.append(text)
        self._entries.append((_match_masks(tokens), len(tokens)))

    def scores(self, text: str) -> list[float]:
        """ROUGE-L F1 of ``text`` (as target) against every indexed text (as prediction), in index order."""
        tokens = rouge_tokenize(text, self.stem)
        n, vocab = len(tokens), set(tokens)
        out = []
        for masks, m in self._entries:
            if not n or not m or vocab.isdisjoint(masks):
                out.append(0.0)
            else:
                out.append(_f1(_lcs_bits(masks, m, tokens), n, m))
        return out


# ---- seed tasks -----------------------------------------------------------------------------------------------


@dataclass
class Task:
    """A seed or machine-generated task: an instruction, its (input, output) instances and its kind."""

    instruction: str
    instances: list[tuple[str, str]]
    is_classification: bool


def load_seed_tasks(path: str | Path) -> list[Task]:
    """Seed tasks as the paper ships them (JSONL of ``{instruction, instances: [{input, output}],
    is_classification}``); a bad record stops with ``file:line: field ...``."""
    path = Path(path)
    if not path.is_file():
        raise LMForgeError(f"{path}: no such file (--seeds)")
    tasks = []
    for where, rec in iter_records(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
            raise LMForgeError(f"{where}: field 'instruction': expected a non-empty string")
        inst = rec.get("instances", [])
        if not isinstance(inst, list) or not all(isinstance(x, dict) and isinstance(x.get("output"), str)
                                                 and isinstance(x.get("input", ""), str) for x in inst):
            raise LMForgeError(f"{where}: field 'instances': expected a list of {{input, output}} strings")
        clf = rec.get("is_classification", False)
        if not isinstance(clf, bool):
            raise LMForgeError(f"{where}: field 'is_classification': expected true or false")
        tasks.append(Task(rec["instruction"].strip(), [(x.get("input", ""), x["output"]) for x in inst], clf))
    if not tasks:
        raise LMForgeError(f"{path}: no seed tasks")
    return tasks


# ---- prompts --------------------------------------------------------------------------------------------------

INSTRUCTION_HEADER = "Come up with a series of tasks:\n\n"
CLASSIFY_HEADER = "Can the following task be regarded as a classification task with finite output labels?\n\n"
INPUT_FIRST_HEADER = ("Come up with examples for the following tasks. Try to generate multiple examples when "
                      "possible. If the task doesn't require additional input, you can generate the output "
                      "directly.\n\n")
OUTPUT_FIRST_HEADER = ("Given the classification task definition and the class labels, generate an input that "
                       "corresponds to each of the class labels. If the task doesn't require input, just generate "
                       "possible class labels.\n\n")


def clean_instruction(text: str) -> str:
    """One line, single spaces, no trailing colon (how instructions are listed in prompts)."""
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def instruction_prompt(instructions: list[str]) -> str:
    """The paper's prompt: the instructions numbered 1..n, ending with ``n+1.`` for the model to continue."""
    body = "".join(f"{i}. {clean_instruction(t)}\n" for i, t in enumerate(instructions, 1))
    return f"{INSTRUCTION_HEADER}{body}{len(instructions) + 1}."


def pick_prompt_instructions(rng: random.Random, seeds: list[str], machine: list[str], n: int = 8,
                             n_machine: int = 2) -> list[str]:
    """``n`` instructions for one prompt: up to ``n_machine`` machine-generated ones, the rest human seeds,
    shuffled (as the paper samples them)."""
    chosen = rng.sample(machine, min(n_machine, len(machine)))
    chosen += rng.sample(seeds, min(n - len(chosen), len(seeds)))
    rng.shuffle(chosen)
    return chosen


def classify_prompt(instruction: str, demos: list[Task]) -> str:
    """Few-shot "Is it classification?" prompt with labelled seed tasks as the examples."""
    shots = "".join(f"Task: {clean_instruction(t.instruction)}\nIs it classification? "
                    f"{'Yes' if t.is_classification else 'No'}\n\n" for t in demos)
    return f"{CLASSIFY_HEADER}{shots}Task: {clean_instruction(instruction)}\nIs it classification?"


def classify_demos(seeds: list[Task], k: int, rng: random.Random) -> list[Task]:
    """``k`` labelled seed tasks for the classification prompt: half of each answer when there are enough,
    alternating Yes/No."""
    yes = [t for t in seeds if t.is_classification]
    no = [t for t in seeds if not t.is_classification]
    n_yes = min(len(yes), max(k // 2, k - len(no)))
    ys, ns = rng.sample(yes, n_yes), rng.sample(no, min(len(no), k - n_yes))
    out = []
    for i in range(max(len(ys), len(ns))):
        out += ys[i : i + 1] + ns[i : i + 1]
    return out


def parse_yes_no(text: str) -> bool | None:
    """True/False for an answer starting with yes/no (any case), None for anything else."""
    word = text.strip().lower()
    if word.startswith("yes"):
        return True
    if word.startswith("no"):
        return False
    return None


def _task_block(t: Task, output_first: bool) -> str:
    lines = [f"Task: {clean_instruction(t.instruction)}"]
    for n, (inp, out) in enumerate(t.instances, 1):
        if output_first:
            lines.append(f"Class label: {out.strip()}")
            if inp.strip():
                lines.append(f"Input: {inp.strip()}")
        else:
            if inp.strip():
                lines += [f"Example {n}", f"Input: {inp.strip()}"]
            lines.append(f"Output: {out.strip()}")
    return "\n".join(lines) + "\n\n"


def instance_prompt(instruction: str, is_classification: bool, demos: list[Task]) -> str:
    """Few-shot instance generation: output-first (class label, then input) for classification tasks, input-first
    otherwise; ends with ``Task: INSTRUCTION`` and a newline for the model to continue."""
    header = OUTPUT_FIRST_HEADER if is_classification else INPUT_FIRST_HEADER
    shots = "".join(_task_block(t, is_classification) for t in demos if t.instances)
    return f"{header}{shots}Task: {clean_instruction(instruction)}\n"


DEMO_MAX_CHARS = 600  # seed tasks longer than this as a demonstration are left out of instance prompts


def demo_pool(seeds: list[Task], is_classification: bool) -> list[Task]:
    """Seed tasks of one kind to demonstrate instances with: those with instances whose demonstration is at most
    DEMO_MAX_CHARS long (a few seeds hold pages of code or text; they would make every prompt long), or all of
    that kind when none is that short."""
    kind = [t for t in seeds if t.is_classification == is_classification and t.instances]
    return [t for t in kind if len(_task_block(t, is_classification)) <= DEMO_MAX_CHARS] or kind


def instance_stops(max_instances: int) -> list[str]:
    return ["Task:", f"Example {max_instances + 1}"]


# ---- parsing and instruction filters ---------------------------------------------------------------------------

_NUMBERED = re.compile(r"\n\s*\d+\s?\.(?!\d)\s*")
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to")
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)

# filter names in the order they are applied (the first that fails is counted)
INSTRUCTION_FILTERS = ("truncated", "too_short", "too_long", "blacklisted", "write_a_program",
                       "starts_with_punctuation", "starts_with_non_ascii", "too_similar")


def parse_instructions(text: str) -> list[str]:
    """The instructions in a numbered continuation of ``instruction_prompt`` (text after its last ``n.``):
    split at line-leading numbers, whitespace collapsed, first letter upper-cased, empty ones dropped."""
    out = []
    for part in _NUMBERED.split("\n" + text):
        inst = re.sub(r"\s+", " ", part).strip()
        if inst:
            out.append(inst[0].upper() + inst[1:])
    return out


def instruction_filter(inst: str, min_words: int = 3, max_words: int = 150) -> str | None:
    """The first of the paper's cheap filters that ``inst`` fails (a name from INSTRUCTION_FILTERS), or None."""
    words = len(inst.split())
    if words < min_words:
        return "too_short"
    if words > max_words:
        return "too_long"
    if _BLACKLIST_RE.search(inst):
        return "blacklisted"
    if inst.startswith("Write a program"):  # the paper's code: these flooded its pool
        return "write_a_program"
    if inst[0] in string.punctuation:
        return "starts_with_punctuation"
    if not inst[0].isascii():
        return "starts_with_non_ascii"
    return None


# ---- instances ------------------------------------------------------------------------------------------------

_EXAMPLE_LINE = re.compile(r"^\s*Example\s*\d*\s*[.:]?\s*$")
_INPUT_LABEL = re.compile(r"^\s*Input\s*\d*\s*:\s?")
_OUTPUT_LABEL = re.compile(r"^\s*Output\s*\d*\s*:\s?")
_CLASS_LABEL = re.compile(r"(?m)^\s*Class label\s*\d*\s*:")

INSTANCE_FILTERS = ("truncated", "empty_output", "input_equals_output", "incomplete", "duplicate", "conflicting",
                    "over_max")


def parse_input_first(text: str) -> list[tuple[str, str]]:
    """(input, output) pairs of an input-first generation: instances start at ``Example N`` lines, or at an
    ``Input:`` line after an output; an instance's input is what precedes its ``Output:`` label (an ``Input:``
    label removed). A block with no ``Output:`` gives an empty output; no label at all gives nothing."""
    if not any(_OUTPUT_LABEL.match(ln) or _INPUT_LABEL.match(ln) for ln in text.split("\n")):
        return []
    blocks: list[list[str]] = [[]]
    has_output = False
    for line in text.split("\n"):
        if _EXAMPLE_LINE.match(line):
            blocks.append([])
            has_output = False
            continue
        if has_output and (_INPUT_LABEL.match(line) or _OUTPUT_LABEL.match(line)):
            blocks.append([])
            has_output = False
        if _OUTPUT_LABEL.match(line):
            has_output = True
        blocks[-1].append(line)
    pairs = []
    for block in blocks:
        if not "\n".join(block).strip():
            continue
        cut = next((i for i, ln in enumerate(block) if _OUTPUT_LABEL.match(ln)), len(block))
        inp = "\n".join(block[:cut]).strip()
        inp = _INPUT_LABEL.sub("", inp, count=1).strip()
        out = ""
        if cut < len(block):
            out = "\n".join([_OUTPUT_LABEL.sub("", block[cut], count=1), *block[cut + 1 :]]).strip()
        pairs.append((inp, out))
    return pairs


def parse_output_first(text: str) -> list[tuple[str, str]]:
    """(input, output) pairs of an output-first generation: each ``Class label: LABEL`` line starts an instance
    whose input is the lines after it (an ``Input:`` label removed) up to an ``Output:`` line, which belongs to
    the other format."""
    pairs = []
    for chunk in _CLASS_LABEL.split(text)[1:]:
        label, _, rest = chunk.partition("\n")
        lines = rest.split("\n")
        cut = next((i for i, ln in enumerate(lines) if _OUTPUT_LABEL.match(ln)), len(lines))
        pairs.append((_INPUT_LABEL.sub("", "\n".join(lines[:cut]).strip(), count=1).strip(), label.strip()))
    return pairs


def filter_instances(pairs: list[tuple[str, str]], max_instances: int = 5,
                     counts: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """Drop instances with an empty output, input == output, an input or output ending with ``:`` (incomplete),
    repeats of an earlier (input, output), every instance of an input that has several different outputs, and
    those after the first ``max_instances``; ``counts`` gets one count per dropped instance under its reason."""
    counts = counts if counts is not None else {}
    kept: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for inp, out in pairs:
        inp, out = inp.strip(), out.strip()
        reason = None
        if not out:
            reason = "empty_output"
        elif inp == out:
            reason = "input_equals_output"
        elif inp.endswith(":") or out.endswith(":"):
            reason = "incomplete"
        elif (inp, out) in seen:
            reason = "duplicate"
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
            continue
        seen.add((inp, out))
        kept.append((inp, out))
    outputs: dict[str, set[str]] = {}
    for inp, out in kept:
        if inp:
            outputs.setdefault(inp, set()).add(out)
    conflicting = {inp for inp, outs in outputs.items() if len(outs) > 1}
    if conflicting:
        before = len(kept)
        kept = [(i, o) for i, o in kept if i not in conflicting]
        counts["conflicting"] = counts.get("conflicting", 0) + before - len(kept)
    if len(kept) > max_instances:
        counts["over_max"] = counts.get("over_max", 0) + len(kept) - max_instances
        kept = kept[:max_instances]
    return kept


# ---- generation backends --------------------------------------------------------------------------------------


@dataclass
class Request:
    """One completion to generate: raw prompt text, stop strings, sampling settings."""

    prompt: str
    stop: list[str]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0


@dataclass
class Generated:
    """A completion cut before its first stop string; ``truncated`` when it ran out of tokens instead."""

    text: str
    truncated: bool


class Backend(Protocol):
    """What ``run_self_instruct`` needs from a model: batched completions and prompt lengths in tokens."""

    context: int

    def count_tokens(self, text: str) -> int: ...

    def generate(self, requests: list[Request]) -> list[Generated]: ...


class ModelBackend:
    """A local model through ``generate_batch``: prompts are encoded as raw text (BOS first when the tokenizer
    adds one), sorted by length, generated ``batch_size`` at a time, and kept to the last tokens that leave room
    for ``max_new_tokens`` in the context."""

    def __init__(self, model, tokenizer, batch_size: int = 8) -> None:
        self.model, self.tok, self.batch_size = model, tokenizer, max(1, batch_size)
        self.context = model.cfg.block_size - model.num_virtual_tokens
        # BOS ends a document too (llama2.c models start the next story with it)
        self.stop_ids = tokenizer.stop_ids()
        self.prompt_tokens = self.new_tokens = 0

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        bos = self.tok.bos_id
        if bos is not None and getattr(self.tok, "add_bos", True) and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def generate(self, requests: list[Request]) -> list[Generated]:
        encoded = []
        for r in requests:
            room = self.context - r.max_new_tokens
            if room < 1:
                raise LMForgeError(f"max new tokens {r.max_new_tokens} leaves no room for a prompt in the context "
                                   f"of {self.context}")
            ids = self.encode(r.prompt)
            if len(ids) > room:  # keep BOS and the end of the prompt
                head = ids[:1] if ids[0] == self.tok.bos_id and room > 1 else []
                ids = head + ids[len(ids) - room + len(head) :]
            encoded.append(ids)
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        results: list[Generated | None] = [None] * len(requests)
        for s in range(0, len(order), self.batch_size):
            part = order[s : s + self.batch_size]
            params = [SamplingParams(temperature=requests[i].temperature, top_p=requests[i].top_p,
                                     max_new_tokens=requests[i].max_new_tokens, seed=requests[i].seed,
                                     repetition_penalty=requests[i].repetition_penalty,
                                     presence_penalty=requests[i].presence_penalty, stop_ids=self.stop_ids,
                                     stop=list(requests[i].stop)) for i in part]
            with torch.no_grad():
                outs = generate_batch(self.model, [encoded[i] for i in part], params, self.tok)
            for i, out in zip(part, outs):
                full = self.tok.decode(out)
                text = cut_at_stop(full, requests[i].stop)  # shorter: a stop string was found
                results[i] = Generated(text, len(text) == len(full) and len(out) >= requests[i].max_new_tokens)
                self.prompt_tokens += len(encoded[i])
                self.new_tokens += len(out)
        return results  # type: ignore[return-value]


def fit_fewshot(build: Callable[[int], str], shots: int, backend: Backend, max_new_tokens: int) -> str:
    """``build(k)`` for the largest k <= shots whose prompt leaves ``max_new_tokens`` in the backend's context
    (``build(0)`` when none does; the backend then keeps its last tokens)."""
    for k in range(shots, 0, -1):
        text = build(k)
        if backend.count_tokens(text) + max_new_tokens <= backend.context:
            return text
    return build(0)


# ---- the driver -----------------------------------------------------------------------------------------------


@dataclass
class SelfInstructConfig:
    """Settings of a run (the paper's where it gives them: 8 prompt instructions of which 2 machine-made,
    temperature 0.7, top-p 0.5 and presence penalty 2 for instructions, greedy with presence penalty 1.5 for
    instances, ROUGE-L threshold 0.7, 5 instances per task)."""

    num: int = 100
    batch_size: int = 8  # instruction prompts per round
    prompt_instructions: int = 8
    machine_in_prompt: int = 2
    temperature: float = 0.7
    top_p: float = 0.5
    max_new_tokens: int = 256  # per instruction-generation prompt
    instance_max_new_tokens: int = 256
    presence_penalty: float = 2.0  # OpenAI's: minus this from the logit of every token already generated
    instance_temperature: float = 0.0
    instance_presence_penalty: float = 1.5
    instance_shots: int = 4
    classify_shots: int = 12
    max_instances: int = 5
    similarity: float = 0.7
    min_words: int = 3
    max_words: int = 150
    max_rounds: int = 0  # 0 = no limit
    patience: int = 5  # stop after this many rounds in a row that keep no instruction (0 = never)
    seed: int = 0

    def check(self) -> None:
        for name in ("num", "batch_size", "prompt_instructions", "max_new_tokens", "instance_max_new_tokens",
                     "max_instances"):
            if getattr(self, name) < 1:
                raise LMForgeError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not 0 <= self.machine_in_prompt <= self.prompt_instructions:
            raise LMForgeError(f"--machine-in-prompt {self.machine_in_prompt}: must be in 0..--prompt-instructions")
        if not 0 < self.similarity <= 1:
            raise LMForgeError(f"--similarity {self.similarity}: must be in (0, 1]")
        if self.temperature < 0 or self.instance_temperature < 0 or not 0 < self.top_p <= 1:
            raise LMForgeError("--temperature and --instance-temperature must be >= 0 and --top-p in (0, 1]")
        if self.max_rounds < 0 or self.patience < 0:
            raise LMForgeError("--max-rounds and --patience must be >= 0")
        for name in ("temperature", "instance_temperature", "presence_penalty", "instance_presence_penalty"):
            if not math.isfinite(getattr(self, name)):  # (NaN logits: every sequence ran to its limit)
                raise LMForgeError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a finite number")


FILES = ("machine_instructions.jsonl", "data.json", "report.json")


@dataclass
class RunState:
    """What a run directory holds: the kept records and the counts so far."""

    records: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    idle_rounds: int = 0  # rounds in a row that kept no instruction
    generated: int = 0
    instruction_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INSTRUCTION_FILTERS, 0))
    instance_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INSTANCE_FILTERS, 0))
    instances_generated: int = 0
    classification: dict[str, int] = field(default_factory=lambda: {"yes": 0, "no": 0, "unclear": 0})


def check_out_dir(out: str | Path, resume: bool) -> None:
    """Refuse an ``out`` that is a file, or a non-empty directory without ``resume``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LMForgeError(f"{out}: exists and is not a directory (--out)")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise LMForgeError(f"{out}: not empty; pass --resume to continue the run in it, or choose another --out")


def open_run_dir(out: Path, resume: bool, seeds_sha: str, log: Callable[[str], None],
                 settings: dict[str, Any] | None = None) -> RunState:
    """A fresh state for an empty ``out``, or with ``resume`` the state it holds (lines of
    machine_instructions.jsonl beyond the count in report.json, left by an interrupted round, are dropped)."""
    check_out_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    report_path, lines_path = out / "report.json", out / "machine_instructions.jsonl"
    if not resume or not report_path.is_file():
        if resume:
            log(f"self-instruct: nothing to resume in {out}: starting")
        lines_path.write_text("", encoding="utf-8")
        return RunState()
    try:
        rep = json.loads(report_path.read_text(encoding="utf-8"))
        lines = lines_path.read_text(encoding="utf-8").splitlines() if lines_path.is_file() else []
        records = [json.loads(ln) for ln in lines[: rep["kept"]]]
    except (ValueError, KeyError, TypeError) as e:
        raise LMForgeError(f"{out}: cannot resume, damaged report.json or machine_instructions.jsonl ({e})") from None
    if len(records) < rep["kept"]:
        raise LMForgeError(f"{out}/machine_instructions.jsonl: {len(records)} records, report.json counts "
                           f"{rep['kept']}: cannot resume")
    if rep.get("settings", {}).get("seeds_sha256") not in (None, seeds_sha):
        raise LMForgeError(f"{out}: made from other seed tasks than --seeds; resume with the same seeds or use "
                           "another --out")
    for key in ("model", "adapter"):  # (another model's data was mixed in, and the report named it alone)
        was, now = rep.get("settings", {}).get(key), (settings or {}).get(key)
        if key in rep.get("settings", {}) and not (same_setting(was, now) or {was, now} <= DEFAULT_NAMES):
            raise LMForgeError(f"{out}: made with --{key} {was or 'none'} (this run: {now or 'none'}); resume with "
                               f"the same --{key}, or use another --out")
    if len(lines) != len(records):
        log(f"self-instruct: dropped {len(lines) - len(records)} records of an interrupted round")
        write_text_atomic(lines_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    st = RunState(records=records, rounds=rep["rounds"], generated=rep["generated"],
                  instances_generated=rep["instances"]["generated"],
                  classification=dict(rep["classification"]))
    st.instruction_counts.update(rep["instruction_filters"])
    st.instance_counts.update({k: v for k, v in rep["instances"].items() if k in INSTANCE_FILTERS})
    log(f"self-instruct: resuming {out}: {len(records)} instructions kept in {st.rounds} rounds (--patience "
        "counts afresh)")
    return st


def alpaca_rows(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"instruction": r["instruction"], "input": x["input"], "output": x["output"]}
            for r in records for x in r["instances"]]


def build_report(st: RunState, cfg: SelfInstructConfig, settings: dict[str, Any]) -> dict[str, Any]:
    rows = alpaca_rows(st.records)
    return {
        "kept": len(st.records), "generated": st.generated, "rounds": st.rounds, "idle_rounds": st.idle_rounds,
        "instruction_filters": dict(st.instruction_counts),
        "classification": dict(st.classification),
        "instances": {"generated": st.instances_generated, **st.instance_counts, "kept": len(rows)},
        "instructions_with_instances": sum(1 for r in st.records if r["instances"]),
        "examples": len(rows),
        "settings": {**asdict(cfg), **settings},
    }


def format_report(rep: dict[str, Any], cfg: SelfInstructConfig) -> list[str]:
    """The per-filter report as aligned lines."""
    names = {"truncated": "cut off by --max-new-tokens", "too_short": f"fewer than {cfg.min_words} words",
             "too_long": f"more than {cfg.max_words} words", "blacklisted": "blacklisted word (image, file, ...)",
             "write_a_program": 'starts with "Write a program"', "starts_with_punctuation": "starts with punctuation",
             "starts_with_non_ascii": "starts with a non-ASCII character",
             "too_similar": f"ROUGE-L >= {cfg.similarity} to a seed or kept one", "empty_output": "empty output",
             "input_equals_output": "input equals output", "incomplete": "ends with ':' (incomplete)",
             "duplicate": "duplicate", "conflicting": "same input, different outputs",
             "over_max": f"beyond {cfg.max_instances} per instruction"}
    lines = [f"instructions generated: {rep['generated']} in {rep['rounds']} rounds"]
    lines += [f"  {names[k]:<45} {v:>6}" for k, v in rep["instruction_filters"].items()]
    lines.append(f"  {'kept':<45} {rep['kept']:>6}")
    c = rep["classification"]
    lines.append(f"classification tasks: {c['yes']} yes, {c['no']} no, {c['unclear']} unclear (taken as no)")
    inst = rep["instances"]
    lines.append(f"instances generated: {inst['generated']}")
    lines += [f"  {names[k]:<45} {inst[k]:>6}" for k in INSTANCE_FILTERS]
    lines.append(f"  {'kept':<45} {inst['kept']:>6}  (for {rep['instructions_with_instances']} instructions)")
    return lines


def _seed_for(seed: int, rnd: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{rnd}:{i}".encode()).digest()[:8], "little") >> 1


def run_self_instruct(seeds_path: str | Path, out: str | Path, cfg: SelfInstructConfig, backend: Backend,
                      resume: bool = False, settings: dict[str, Any] | None = None, progress: bool = True,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate instructions round by round until ``cfg.num`` are kept (or ``max_rounds``/``patience`` stop it),
    with their classification and filtered instances; returns the report (also in ``out/report.json``)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    cfg.check()
    out, seeds_path = Path(out), Path(seeds_path)
    seeds = load_seed_tasks(seeds_path)
    seeds_sha = sha256_file(seeds_path)
    settings = {**(settings or {}), "seeds": str(seeds_path), "seeds_sha256": seeds_sha}
    st = open_run_dir(out, resume, seeds_sha, log, settings)
    seed_texts = [t.instruction for t in seeds]
    index = RougeIndex(seed_texts + [r["instruction"] for r in st.records])
    clf_demos = classify_demos(seeds, cfg.classify_shots, random.Random(f"clf:{cfg.seed}"))
    pools = {clf: demo_pool(seeds, clf) for clf in (False, True)}
    lines_path = out / "machine_instructions.jsonl"
    bar = tqdm(total=cfg.num, initial=min(len(st.records), cfg.num), desc="self-instruct", unit="instr",
               file=sys.stderr, dynamic_ncols=True, disable=not progress,
               mininterval=0.2 if sys.stderr.isatty() else 10.0)
    stop_reason = None

    def stage(name: str) -> None:
        bar.set_postfix(round=st.rounds + 1, stage=name, generated=st.generated)

    try:
        while len(st.records) < cfg.num:
            if cfg.max_rounds and st.rounds >= cfg.max_rounds:
                stop_reason = f"--max-rounds {cfg.max_rounds} reached"
                break
            if cfg.patience and st.idle_rounds >= cfg.patience:
                stop_reason = f"{st.idle_rounds} rounds in a row kept no instruction (--patience {cfg.patience})"
                break
            new = _round(st, cfg, backend, pools, seed_texts, index, clf_demos, stage)
            with lines_path.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                f.flush()
                os.fsync(f.fileno())
            st.records += new
            st.rounds += 1
            st.idle_rounds = 0 if new else st.idle_rounds + 1
            write_json(out / "data.json", alpaca_rows(st.records))
            write_json(out / "report.json", build_report(st, cfg, settings))
            bar.update(len(new))
    finally:
        bar.close()
    rep = build_report(st, cfg, settings)
    rep["stopped"] = stop_reason
    write_json(out / "data.json", alpaca_rows(st.records))
    write_json(out / "report.json", rep)
    return rep


def _round(st: RunState, cfg: SelfInstructConfig, backend: Backend, demo_pools: dict[bool, list[Task]],
           seed_texts: list[str], index: RougeIndex, clf_demos: list[Task],
           stage: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """One round: generate, filter and keep instructions (up to the number still needed), classify them and
    generate their instances. Counts go into ``st``; returns the new records."""
    rng = random.Random(f"round:{cfg.seed}:{st.rounds}")
    machine = [r["instruction"] for r in st.records]
    stops = ["\n\n", f"\n{2 * cfg.prompt_instructions}."]
    requests = [Request(instruction_prompt(pick_prompt_instructions(rng, seed_texts, machine,
                                                                    cfg.prompt_instructions, cfg.machine_in_prompt)),
                        stops, cfg.max_new_tokens, cfg.temperature, cfg.top_p, _seed_for(cfg.seed, st.rounds, i),
                        presence_penalty=cfg.presence_penalty) for i in range(cfg.batch_size)]
    kept: list[tuple[str, dict[str, float], float]] = []
    need = cfg.num - len(st.records)
    stage("instructions")
    for g in backend.generate(requests):
        cands = parse_instructions(g.text)
        for j, inst in enumerate(cands):
            if len(kept) >= need:
                break
            st.generated += 1
            reason = "truncated" if g.truncated and j == len(cands) - 1 else instruction_filter(
                inst, cfg.min_words, cfg.max_words)
            scores: list[float] = []
            if reason is None:
                scores = index.scores(inst)
                if scores and max(scores) >= cfg.similarity:
                    reason = "too_similar"
            if reason:
                st.instruction_counts[reason] += 1
                continue
            top = sorted(range(len(scores)), key=lambda i: -scores[i])[:10]
            kept.append((inst, {index.texts[i]: scores[i] for i in top}, sum(scores) / max(1, len(scores))))
            index.add(inst)
    if not kept:
        return []
    stage("classify")  # classification identification (greedy, as in the paper)
    clf_requests = [Request(fit_fewshot(lambda k, inst=inst: classify_prompt(inst, clf_demos[:k]), len(clf_demos),
                                        backend, 3), ["\n", "Task"], 3) for inst, _, _ in kept]
    is_clf = []
    for g in backend.generate(clf_requests):
        answer = parse_yes_no(g.text)
        st.classification["yes" if answer else "no" if answer is False else "unclear"] += 1
        is_clf.append(bool(answer))
    # instance generation: few-shot with seed tasks of the same kind
    inst_requests = []
    for n, ((inst, _, _), clf) in enumerate(zip(kept, is_clf)):
        pool = demo_pools[clf]
        demos = rng.sample(pool, min(cfg.instance_shots, len(pool)))
        prompt = fit_fewshot(lambda k, inst=inst, clf=clf, demos=demos: instance_prompt(inst, clf, demos[:k]),
                             len(demos), backend, cfg.instance_max_new_tokens)
        inst_requests.append(Request(prompt, instance_stops(cfg.max_instances), cfg.instance_max_new_tokens,
                                     cfg.instance_temperature, 1.0, _seed_for(cfg.seed, st.rounds, 10_000 + n),
                                     presence_penalty=cfg.instance_presence_penalty))
    stage("instances")
    records = []
    for (inst, similar, avg), clf, g in zip(kept, is_clf, backend.generate(inst_requests)):
        pairs = parse_output_first(g.text) if clf else parse_input_first(g.text)
        st.instances_generated += len(pairs)
        if g.truncated and pairs:  # the last one may be cut off
            pairs = pairs[:-1]
            st.instance_counts["truncated"] += 1
        good = filter_instances(pairs, cfg.max_instances, st.instance_counts)
        records.append({"instruction": inst, "is_classification": clf, "most_similar": similar,
                        "avg_similarity_score": avg, "round": st.rounds,
                        "instances": [{"input": i, "output": o} for i, o in good], "raw_instances": g.text})
    return records
