"""Running a task on a model: build each document's prompt (demonstrations + query), score or generate, compute the
metrics with their standard errors, keep every question's record."""

from __future__ import annotations

import math
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.eval.fewshot import Selector
from lmforge.eval.scoring import Scorer, perplexity_metrics
from lmforge.eval.tasks import (
    INVALID,
    Task,
    cot_exemplar_docs,
    extract_flexible,
    extract_strict,
    get_task,
    normalize_answer,
)
from lmforge.infer.sampling import cut_at_stop


@dataclass
class EvalConfig:
    """What to evaluate; the fields are ``lmforge eval``'s options (and the keys of ``run_task``'s task_spec)."""

    task: str
    data: str
    fewshot_data: str | None = None
    shots: int = 0
    select: str = "first_n"
    order: str = "as_drawn"
    seed: int = 1234
    cot: bool = False
    samples: int = 1
    temperature: float = 0.7  # sampling temperature of self-consistency (--samples > 1)
    max_new_tokens: int = 256
    limit: int | None = None
    context: int | None = None  # perplexity window (default: the model's context)
    stride: int | None = None  # perplexity stride (default: the window: every token predicted once)
    batch_tokens: int | None = None  # tokens per forward (None: 1024 on a CPU, 4096 on a GPU)
    max_batch: int = 32
    add_bos: bool = False


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, float]
    n: int
    seconds: float
    tokens: int
    subjects: dict[str, dict[str, float]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        """The command's last line: ``TASK metric=value ... n=N``."""
        keys = {"choice": ["acc", "acc_norm"], "generate": ["exact_match_strict", "exact_match_flexible"],
                "perplexity": ["ppl", "bits_per_byte"]}[self.config.get("kind", "choice")]
        return " ".join([self.task] + [f"{k}={self.metrics[k]:.4f}" for k in keys] + [f"n={self.n}"])

    def to_json(self) -> dict:
        """The results as JSON-safe values: a metric that is not finite (an overflowing perplexity, the stderr of one
        example) becomes null, since ``json.dumps`` would write ``Infinity`` or ``NaN``, which are not JSON."""
        return {"task": self.task, "metrics": {k: _finite_or_none(v) for k, v in self.metrics.items()}, "n": self.n,
                "seconds": self.seconds, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s,
                "subjects": self.subjects, "config": self.config, "records": self.records}


def _finite_or_none(v: object) -> object:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-evaluation-harness reports."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def build_context(task: Task, doc: dict, demos: list[dict]) -> str:
    """Description, then each demonstration as text + target_delimiter + target + fewshot_delimiter, then the query."""
    shots = "".join(task.doc_to_text(d) + task.target_delimiter + task.doc_to_target(d) + task.fewshot_delimiter
                    for d in demos)
    return task.description(doc) + shots + task.doc_to_text(doc)


class _Demos:
    """Demonstration pools (one per subject file for MMLU) with their selectors."""

    def __init__(self, task: Task, cfg: EvalConfig) -> None:
        self.task, self.cfg = task, cfg
        self.selectors: dict[str, Selector] = {}
        self.warned: set[str] = set()
        self.root = Path(cfg.fewshot_data) if cfg.fewshot_data else None
        if cfg.shots > 0 and self.root is None and task.name != "gsm8k_cot":
            raise LMForgeError(f"--shots {cfg.shots} needs --fewshot-data (demonstrations)")
        if self.root is not None and not self.root.exists():
            raise LMForgeError(f"{self.root}: no such file or directory")

    def _selector(self, doc: dict) -> Selector | None:
        key, loader = "", None
        if self.root is None:  # gsm8k CoT: the 8 exemplars of Wei et al.
            loader = cot_exemplar_docs
        elif self.task.fewshot_files is not None:
            f = self.task.fewshot_files(self.root, doc)
            if f is None:
                return None
            key, loader = str(f), (lambda f=f: self.task.load(f))
        else:
            loader = lambda: self.task.load(self.root)  # noqa: E731
        if key not in self.selectors:
            pool = loader()
            if not pool and self.root is not None:  # (an empty file ran zero-shot after a warning, exit 0)
                raise LMForgeError(f"{key or self.root}: no demonstrations in it (--fewshot-data, --shots "
                                   f"{self.cfg.shots})")
            self.selectors[key] = Selector(pool, self.task.doc_to_text, self.cfg.select, self.cfg.order, self.cfg.seed)
        return self.selectors[key]

    def for_doc(self, doc: dict, index: int) -> list[dict]:
        if self.cfg.shots <= 0:
            return []
        sel = self._selector(doc)
        if sel is None:
            raise LMForgeError(f"{self.root}: no demonstrations for subject {doc.get('subject')!r} "
                               f"(expected {doc.get('subject')}_dev.csv)")
        demos = sel.select(doc, self.cfg.shots, index)
        subject = doc.get("subject", "")
        if len(demos) < self.cfg.shots and subject not in self.warned:  # once per subject
            self.warned.add(subject)
            about = f" for subject {subject!r}" if subject else ""
            print(f"warning: --shots {self.cfg.shots} but only {len(demos)} demonstration(s) available{about} "
                  "(the question itself is never one)", file=sys.stderr)
        return demos


def evaluate(model, tokenizer, cfg: EvalConfig) -> EvalResult:
    """Run one task; see ``EvalConfig``."""
    task = get_task(cfg.task, cfg.cot, cfg.shots)
    if cfg.samples < 1:
        raise LMForgeError("--samples must be >= 1")
    if cfg.samples > 1 and task.kind != "generate":
        raise LMForgeError("--samples (self-consistency) applies to generation tasks (gsm8k)")
    if cfg.shots < 0:
        raise LMForgeError("--shots must be >= 0")
    if (cfg.context is not None or cfg.stride is not None) and task.kind != "perplexity":
        raise LMForgeError("--context and --stride apply to perplexity tasks (rolling windows); other tasks score "
                           "within the model's context")
    docs = task.load(Path(cfg.data))
    if cfg.limit is not None:
        docs = limit_docs(docs, cfg.limit, Path(cfg.data).is_dir())
    if not docs:
        raise LMForgeError(f"{cfg.data}: no documents")
    scorer = Scorer(model, tokenizer, cfg.batch_tokens, cfg.max_batch, add_bos=cfg.add_bos)
    start = time.perf_counter()
    if task.kind == "perplexity":
        res = _perplexity(scorer, docs, cfg)
    elif task.kind == "choice":
        res = _choice(scorer, task, docs, cfg)
    else:
        res = _generate(scorer, task, docs, cfg)
    res.seconds = time.perf_counter() - start
    res.tokens = scorer.tokens if task.kind != "generate" else res.tokens
    res.config = {**asdict(cfg), "kind": task.kind, "prompt_task": task.name}
    return res


def limit_docs(docs: list[dict], limit: int, folder: bool) -> list[dict]:
    """The first ``limit`` documents, or of a folder of subjects the first ``limit`` of each subject
    (lm-evaluation-harness' --limit is per task, and each MMLU subject is a task)."""
    if not folder or not any("subject" in d for d in docs):
        return docs[:limit]
    seen: Counter = Counter()
    out = []
    for d in docs:
        seen[d.get("subject")] += 1
        if seen[d.get("subject")] <= limit:
            out.append(d)
    return out


def _choice(scorer: Scorer, task: Task, docs: list[dict], cfg: EvalConfig) -> EvalResult:
    demos = _Demos(task, cfg)
    groups, prompts, choice_texts = [], [], []
    for i, doc in enumerate(docs):
        ctx = build_context(task, doc, demos.for_doc(doc, i))
        choices = task.doc_to_choices(doc)
        prompts.append(ctx)
        choice_texts.append(choices)
        groups.append(scorer.encode_group(ctx, [task.target_delimiter + c for c in choices]))
    scores = scorer.score(groups)
    records, acc, acc_norm = [], [], []
    by_subject: dict[str, list[tuple[float, float]]] = {}
    for doc, ctx, choices, s in zip(docs, prompts, choice_texts, scores):
        norm = [x / max(len(c), 1) for x, c in zip(s, choices)]  # per character of the choice, as the harness
        pred, pred_n = max(range(len(s)), key=lambda j: (s[j], -j)), max(range(len(s)), key=lambda j: (norm[j], -j))
        a, an = float(pred == doc["gold"]), float(pred_n == doc["gold"])
        acc.append(a)
        acc_norm.append(an)
        if "subject" in doc:
            by_subject.setdefault(doc["subject"], []).append((a, an))
        records.append({"id": doc.get("id"), "subject": doc.get("subject"), "prompt": ctx, "choices": choices,
                        "scores": s, "scores_norm": norm, "choice": pred, "choice_norm": pred_n, "gold": doc["gold"],
                        "correct": bool(a)})
    m, se = mean_stderr(acc)
    mn, sen = mean_stderr(acc_norm)
    subjects = {k: {"acc": sum(a for a, _ in v) / len(v), "acc_norm": sum(b for _, b in v) / len(v), "n": len(v)}
                for k, v in sorted(by_subject.items())}
    return EvalResult(cfg.task, {"acc": m, "acc_stderr": se, "acc_norm": mn, "acc_norm_stderr": sen}, len(docs), 0.0,
                      0, subjects, records)


def majority(answers: list[str]) -> str:
    """The most common valid answer (first seen wins a tie); ``[invalid]`` if none is valid."""
    valid = [a for a in answers if a != INVALID]
    if not valid:
        return INVALID
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)


def _generate(scorer: Scorer, task: Task, docs: list[dict], cfg: EvalConfig) -> EvalResult:
    from lmforge.infer.generate import generate_batch
    from lmforge.infer.sampling import SamplingParams

    model, tok = scorer.model, scorer.tok
    demos = _Demos(task, cfg)
    prompts = [build_context(task, d, demos.for_doc(d, i)) for i, d in enumerate(docs)]
    room = model.cfg.block_size - cfg.max_new_tokens
    if room < 1:
        raise LMForgeError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room in the context "
                           f"of {model.cfg.block_size}")
    bos = [tok.bos_id] if cfg.add_bos and tok.bos_id is not None else []
    ids = [(bos + tok.encode(p))[-room:] for p in prompts]
    stops = list(task.stop)
    stop_ids = [tok.eos_id] if tok.eos_id is not None else []
    jobs = [(i, s) for i in range(len(docs)) for s in range(cfg.samples)]
    jobs.sort(key=lambda j: -len(ids[j[0]]))
    outputs: dict[tuple[int, int], str] = {}
    tokens = 0
    for b in range(0, len(jobs), cfg.max_batch):
        part = jobs[b : b + cfg.max_batch]
        params = [SamplingParams(temperature=0.0 if cfg.samples == 1 else cfg.temperature,
                                 top_p=1.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7919 * i + s,
                                 stop_ids=stop_ids, stop=stops) for i, s in part]
        outs = generate_batch(model, [ids[i] for i, _ in part], params, tok)
        for (i, s), o in zip(part, outs):
            outputs[i, s] = cut_at_stop(tok.decode(o), stops)
            tokens += len(ids[i]) + len(o)
    records, strict_ok, flex_ok = [], [], []
    for i, doc in enumerate(docs):
        texts = [outputs[i, s] for s in range(cfg.samples)]
        strict = majority([normalize_answer(extract_strict(t, task.strict)) if extract_strict(t, task.strict)
                           != INVALID else INVALID for t in texts])
        flex = majority([normalize_answer(extract_flexible(t)) if extract_flexible(t) != INVALID else INVALID
                         for t in texts])
        gold = normalize_answer(doc["answer"])
        strict_ok.append(float(strict == gold))
        flex_ok.append(float(flex == gold))
        records.append({"id": doc.get("id"), "prompt": prompts[i], "generations": texts, "strict": strict,
                        "flexible": flex, "gold": gold, "correct": flex == gold})
    m, se = mean_stderr(strict_ok)
    mf, sef = mean_stderr(flex_ok)
    return EvalResult(cfg.task, {"exact_match_strict": m, "exact_match_strict_stderr": se,
                                 "exact_match_flexible": mf, "exact_match_flexible_stderr": sef},
                      len(docs), 0.0, tokens, {}, records)


def _perplexity(scorer: Scorer, docs: list[dict], cfg: EvalConfig) -> EvalResult:
    if cfg.context is not None and cfg.context > scorer.block_size:  # the windows are cut to the model's context
        print(f"note: --context {cfg.context:,} is more than the model's context of {scorer.block_size:,}: "
              f"windows of {scorer.block_size:,} tokens", file=sys.stderr)
    nll, n_tok, n_bytes, n_words, records = 0.0, 0, 0, 0, []
    for doc in docs:
        text = doc["text"]
        ids = scorer.tok.encode(text)
        d_nll, d_n = scorer.rolling(ids, cfg.context, cfg.stride)
        w = len(re.split(r"\s+", text))  # lm-evaluation-harness' word count for word perplexity
        nll, n_tok, n_bytes, n_words = nll + d_nll, n_tok + d_n, n_bytes + len(text.encode("utf-8")), n_words + w
        records.append({"id": doc.get("id"), "nll": d_nll, "tokens": d_n, "bytes": len(text.encode("utf-8")),
                        "words": w})
    if n_tok == 0:
        raise LMForgeError(f"{cfg.data}: the text encodes to no tokens")
    return EvalResult("perplexity", perplexity_metrics(nll, n_tok, n_bytes, n_words), n_tok, 0.0, 0, {}, records)


def run_task(model, tokenizer, task_spec: dict) -> dict[str, float]:
    """Evaluate ``model`` on one task and return its metrics (with ``n``); ``task_spec`` holds ``EvalConfig``'s fields,
    e.g. ``{"task": "mmlu", "data": "mmlu/", "fewshot_data": "mmlu/", "shots": 5, "limit": 200}``."""
    known = set(EvalConfig.__dataclass_fields__)
    unknown = sorted(set(task_spec) - known)
    if unknown:
        raise LMForgeError(f"unknown eval task option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    if "task" not in task_spec or "data" not in task_spec:
        raise LMForgeError("an eval task needs 'task' and 'data'")
    was_training = model.training
    try:
        res = evaluate(model, tokenizer, EvalConfig(**task_spec))
    finally:
        model.train(was_training)
    return {**res.metrics, "n": float(res.n)}
