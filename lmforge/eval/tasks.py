"""Evaluation tasks as small declarative definitions: how to read the local files, the prompt of a document, its
choices or generation rules. The prompts are lm-evaluation-harness' (tasks/mmlu, arc, gsm8k, gsm8k-cot, cmmlu).

Every loader returns documents as dicts with ``question`` and, by kind: ``choices`` + ``gold`` (multiple choice),
``answer`` (generation), ``text`` (perplexity); ``subject`` where the task has subjects.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LMForgeError
from lmforge.files import read_json_lines, read_utf8

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Task:
    """A task: ``kind`` is ``choice`` (log-likelihood of each choice), ``generate`` or ``perplexity``."""

    name: str
    kind: str
    load: Callable[[Path], list[dict]]
    doc_to_text: Callable[[dict], str] = lambda d: d["question"]
    doc_to_target: Callable[[dict], str] = lambda d: ""  # a demonstration's answer (after target_delimiter)
    doc_to_choices: Callable[[dict], list[str]] = lambda d: d["choices"]
    description: Callable[[dict], str] = lambda d: ""  # text before the demonstrations
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop: tuple[str, ...] = ()
    strict: str = ""  # regex whose first group is the strict-match answer (generation)
    fewshot_files: Callable[[Path, dict], Path | None] | None = None  # per-document demonstration file (MMLU dev)
    extras: dict = field(default_factory=dict)


# ---- file readers ------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file, each with its line number as ``_line``."""
    return [{**d, "_line": n} for n, d in read_json_lines(path)]


def _files(path: Path, pattern: str) -> list[Path]:
    if not path.exists():
        raise LMForgeError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(path.glob(pattern))
    if not files:
        raise LMForgeError(f"{path}: no {pattern} files")
    return files


_SPLIT = re.compile(r"_(test|dev|val|validation|train)$")


def subject_of(path: Path) -> str:
    """``high_school_physics_test.csv`` -> ``high_school_physics``."""
    return _SPLIT.sub("", path.stem)


def _gold_index(value: str, n: int, where: str) -> int:
    v = value.strip()
    if v in LETTERS[:n]:
        return LETTERS.index(v)
    if v.isdigit() and int(v) < n:
        return int(v)
    raise LMForgeError(f"{where}: answer {value!r} is neither a letter A-{LETTERS[n - 1]} nor an index 0-{n - 1}")


def read_choice_csv(path: Path) -> list[dict]:
    """MMLU/CMMLU CSV rows: headerless ``question,A,B,C,D,letter``, a header ``question,choice0..3,answer``
    (answer an index or a letter) or CMMLU's ``,Question,A,B,C,D,Answer``."""
    text = read_utf8(path, "CSV file")  # (a byte-order mark was read into the first header)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise LMForgeError(f"{path}: cannot read CSV: {e}") from None
    if not rows:
        return []
    head = [h.strip().lower() for h in rows[0]]
    docs = []
    if "question" in head and "answer" not in head:  # (read as a headerless row: "answer 'choice3' is neither ...")
        raise LMForgeError(f"{path}:1: its header has no 'answer' column (question,choice0,...,answer or "
                           "question,A,B,...,answer)")
    if "answer" in head and "question" in head:
        qi, ai = head.index("question"), head.index("answer")
        if "choice0" in head:
            ci = [i for i, h in enumerate(head) if re.fullmatch(r"choice\d+", h)]
        else:
            ci = [head.index(x.lower()) for x in LETTERS if x.lower() in head]
        body = [(n, r) for n, r in enumerate(rows[1:], 2)]
    else:
        qi, ci, ai = 0, list(range(1, len(rows[0]) - 1)), len(rows[0]) - 1
        body = list(enumerate(rows, 1))
    if len(ci) < 2:  # (a header with question and answer alone read as "answer 'A' is neither A-J nor 0--1")
        found = "header" if "question" in head and "answer" in head else "first row"
        raise LMForgeError(f"{path}:1: {len(ci)} choice column(s) in the {found}: expected question,A,B,C,D,answer "
                           "(no header), question,choice0,...,answer or question,A,B,...,answer")
    if len(ci) > len(LETTERS):  # (a JSONL file split at its commas: "string index out of range" naming no file)
        raise LMForgeError(f"{path}:1: not an MMLU CSV (question, choices..., answer letter): found "
                           f"{len(rows[0])} columns, at most {len(LETTERS)} choices")
    subject = subject_of(path)
    for n, r in body:
        if not any(x.strip() for x in r):
            continue
        if len(r) <= max(qi, ai, *ci):
            raise LMForgeError(f"{path}:{n}: expected {max(qi, ai, *ci) + 1} columns, found {len(r)}")
        choices = [r[i] for i in ci]
        docs.append({"question": r[qi], "choices": choices, "gold": _gold_index(r[ai], len(choices), f"{path}:{n}"),
                     "subject": subject, "id": f"{subject}:{n}"})
    return docs


def load_mmlu(path: Path) -> list[dict]:
    """A folder of ``{subject}_test.csv`` (else any ``*.csv``, e.g. the ``_dev`` files) or one CSV file."""
    files = sorted(path.glob("*_test.csv")) if path.is_dir() else []
    docs: list[dict] = []
    for f in files or _files(path, "*.csv"):
        docs += read_choice_csv(f)
    return docs


def load_arc(path: Path) -> list[dict]:
    """ARC JSONL: ``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`` (the original files) or
    the flattened ``{"question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}``."""
    docs = []
    for f in _files(path, "*.jsonl"):
        for d in read_jsonl(f):
            where = f"{f}:{d['_line']}"
            try:
                q = d["question"]
                if isinstance(q, dict):
                    stem, ch = q["stem"], q["choices"]
                    texts, labels = [c["text"] for c in ch], [c["label"] for c in ch]
                else:
                    stem, texts, labels = q, d["choices"]["text"], d["choices"]["label"]
                gold = labels.index(d["answerKey"])
            except KeyError as e:
                raise LMForgeError(f"{where}: not an ARC record (no field {e.args[0]!r})") from None
            except (TypeError, ValueError):
                raise LMForgeError(f"{where}: not an ARC record (question with choices text and label, and an "
                                   "answerKey among the labels)") from None
            if len(texts) != len(labels) or not all(isinstance(t, str) for t in [stem, *texts]):
                raise LMForgeError(f"{where}: not an ARC record ({len(texts)} choice texts for {len(labels)} "
                                   "labels, or a question or choice that is not text)")
            _two_choices(texts, where)
            docs.append({"question": stem, "choices": texts, "gold": gold, "id": d.get("id", where)})
    return docs


def _two_choices(choices: list, where: str) -> None:
    """A question of one choice would be scored correct whatever the model does: refused, naming its line."""
    if len(choices) < 2:
        raise LMForgeError(f"{where}: {len(choices)} choice(s); a multiple-choice question needs at least 2")


def load_choice_jsonl(path: Path) -> list[dict]:
    """Generic multiple choice JSONL: ``{"question", "choices": [...], "answer": index | letter | choice text}``;
    an optional ``"query"`` is used verbatim as the prompt."""
    docs = []
    for f in _files(path, "*.jsonl"):
        for d in read_jsonl(f):
            where = f"{f}:{d['_line']}"
            if not isinstance(d.get("choices"), list) or "answer" not in d or not ("question" in d or "query" in d):
                raise LMForgeError(f"{where}: expected fields question (or query), choices (a list) and answer")
            ans, choices = d["answer"], [str(c) for c in d["choices"]]
            if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(choices):  # (true was index 1)
                gold = ans
            elif isinstance(ans, str) and ans in choices:
                gold = choices.index(ans)
            elif isinstance(ans, str):
                gold = _gold_index(ans, len(choices), where)
            else:
                raise LMForgeError(f"{where}: answer {ans!r} is not a choice index, letter or text")
            _two_choices(choices, where)
            docs.append({"question": d.get("question", ""), "query": d.get("query"), "choices": choices, "gold": gold,
                         "id": d.get("id", where)})
    return docs


_GSM_NUMBER = re.compile(r"[-+]?\$?[0-9][0-9,]*(\.[0-9]+)?\.?")
_GSM_FINAL = re.compile(r"####\s*[-+]?\$?[0-9][0-9,]*(\.[0-9]+)?\.?\s*$")


def load_gsm8k(path: Path) -> list[dict]:
    docs = []
    for f in _files(path, "*.jsonl"):
        for d in read_jsonl(f):
            if not isinstance(d.get("question"), str) or not isinstance(d.get("answer"), (str, int, float)) or \
                    isinstance(d.get("answer"), bool):  # (a null answer became the gold answer "None")
                raise LMForgeError(f"{f}:{d['_line']}: expected fields question (text) and answer (text or a number)")
            a = d["answer"]
            if isinstance(a, str) and not (_GSM_FINAL.search(a) or _GSM_NUMBER.fullmatch(a.strip())):
                # (the gold was the whole rationale, lower-cased: no model's answer could match it)
                raise LMForgeError(f"{f}:{d['_line']}: answer has no final '#### N' (GSM8K's form: the solution, then "
                                   f"'#### 42'; or the number alone): ends {a.strip()[-40:]!r}")
            docs.append({"question": d["question"], "answer": str(a),
                         "id": d.get("id", f"{f.name}:{d['_line']}")})
    return docs


def read_json_array(path: Path) -> list[dict]:
    """A ``.json`` file holding an array of objects (as every other lmforge command reads .json); ``_line`` is the
    1-based record number."""
    try:
        data = json.loads(read_utf8(path))
    except ValueError as e:
        raise LMForgeError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, list):
        raise LMForgeError(f"{path}: expected a JSON array of objects (got {type(data).__name__})")
    for i, d in enumerate(data, 1):
        if not isinstance(d, dict):
            raise LMForgeError(f"{path}: record {i}: expected a JSON object (got {type(d).__name__})")
        d["_line"] = i
    return data


def load_text(path: Path) -> list[dict]:
    """A text file is one document; a JSONL file holds one document per line in its ``text`` field, a ``.json``
    file an array of such records."""
    docs = []
    for f in _files(path, "*.txt"):
        if f.suffix == ".json":
            for d in read_json_array(f):
                if not isinstance(d.get("text"), str):
                    raise LMForgeError(f"{f}: record {d['_line']}: expected a string field 'text'")
                docs.append({"question": "", "text": d["text"], "id": f"{f.name}:{d['_line']}"})
        elif f.suffix == ".jsonl":
            for d in read_jsonl(f):
                if not isinstance(d.get("text"), str):
                    raise LMForgeError(f"{f}:{d['_line']}: expected a string field 'text'")
                docs.append({"question": "", "text": d["text"], "id": f"{f.name}:{d['_line']}"})
        else:
            # (a byte-order mark was scored as text: SmolLM2's perplexity of one sentence 23 -> 46,561)
            docs.append({"question": "", "text": read_utf8(f), "id": f.name})
    return docs


# ---- prompts ------------------------------------------------------------------------------------------------------
def _lettered(question: str, choices: list[str], answer_word: str) -> str:
    lines = [question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + f"\n{answer_word}"


def _mmlu_dev(folder: Path, doc: dict) -> Path | None:
    if folder.is_file():
        return folder
    p = folder / f"{doc['subject']}_dev.csv"
    return p if p.is_file() else None


# GSM8K chain-of-thought exemplars of Wei et al. 2022 (Table 20), as in lm-evaluation-harness' gsm8k-cot task.
COT_EXEMPLARS: list[tuple[str, str]] = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
     "will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
     "had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The "
     "answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The "
     "answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls "
     "did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. "
     "23 - 15 is 8. The answer is 8."),
]


def cot_rationale(answer: str) -> str:
    """A GSM8K solution in the CoT form: calculator annotations dropped, ``#### N`` -> ``The answer is N.``"""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip().replace("\n", " ")
    return f"{body} The answer is {final.strip()}."


TASKS: dict[str, Task] = {
    "mmlu": Task(
        "mmlu", "choice", load_mmlu,
        doc_to_text=lambda d: _lettered(d["question"], d["choices"], "Answer:"),
        doc_to_target=lambda d: LETTERS[d["gold"]],
        doc_to_choices=lambda d: list(LETTERS[: len(d["choices"])]),
        description=lambda d: "The following are multiple choice questions (with answers) about "
                              f"{d['subject'].replace('_', ' ')}.\n\n",
        fewshot_files=_mmlu_dev),
    "cmmlu": Task(
        "cmmlu", "choice", load_mmlu,
        doc_to_text=lambda d: _lettered(d["question"], d["choices"], "答案："),
        doc_to_target=lambda d: LETTERS[d["gold"]],
        doc_to_choices=lambda d: list(LETTERS[: len(d["choices"])]),
        description=lambda d: f"以下是关于{d['subject'].replace('_', ' ')}的单项选择题，请直接给出正确答案的选项。\n\n",
        fewshot_files=_mmlu_dev),
    "arc": Task(
        "arc", "choice", load_arc,
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        doc_to_target=lambda d: d["choices"][d["gold"]]),
    "jsonl": Task(
        "jsonl", "choice", load_choice_jsonl,
        doc_to_text=lambda d: d["query"] if d.get("query") else f"Question: {d['question']}\nAnswer:",
        doc_to_target=lambda d: d["choices"][d["gold"]]),
    "gsm8k": Task(
        "gsm8k", "generate", load_gsm8k,
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        doc_to_target=lambda d: d["answer"],
        stop=("Question:", "</s>", "<|im_end|>"),
        strict=r"#### (\-?[0-9\.\,]+)"),
    # lm-evaluation-harness gsm8k_cot (few-shot) and gsm8k_cot_zeroshot: chosen by --cot
    "gsm8k_cot": Task(
        "gsm8k_cot", "generate", load_gsm8k,
        doc_to_text=lambda d: f"Q: {d['question']}\nA:",
        doc_to_target=lambda d: d["rationale"] if "rationale" in d else cot_rationale(d["answer"]),
        stop=("Q:", "</s>", "<|im_end|>"),
        strict=r"The answer is (\-?[0-9\.\,]+)."),
    "gsm8k_cot_zeroshot": Task(
        "gsm8k_cot_zeroshot", "generate", load_gsm8k,
        doc_to_text=lambda d: f"Q: {d['question']}\nA: Let's think step by step.",
        stop=("Q:", "</s>", "<|im_end|>"),
        strict=r"The answer is (\-?[0-9\.\,]+)."),
    "perplexity": Task("perplexity", "perplexity", load_text),
}

CLI_TASKS = ["mmlu", "arc", "gsm8k", "perplexity", "cmmlu", "jsonl"]


def get_task(name: str, cot: bool = False, shots: int = 0) -> Task:
    if name not in TASKS:
        raise LMForgeError(f"unknown task {name!r}; choose from {', '.join(CLI_TASKS)}")
    if cot:
        if name != "gsm8k":
            raise LMForgeError(f"--cot applies to generation tasks (gsm8k), not {name}")
        return TASKS["gsm8k_cot" if shots > 0 else "gsm8k_cot_zeroshot"]
    return TASKS[name]


def cot_exemplar_docs() -> list[dict]:
    return [{"question": q, "rationale": a, "answer": a, "id": f"cot{i}"} for i, (q, a) in enumerate(COT_EXEMPLARS)]


# ---- answers of generation tasks ------------------------------------------------------------------------------------
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [",", r"\$", r"(?s).*#### ", r"\.$"]  # lm-evaluation-harness gsm8k exact_match regexes_to_ignore
INVALID = "[invalid]"


def extract_strict(text: str, pattern: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else INVALID


def extract_flexible(text: str) -> str:
    """The last number in the text (harness flexible-extract: the last match, its first non-empty group)."""
    found = _FLEX.findall(text)
    if not found:
        return INVALID
    return next(g for g in found[-1] if g)


def normalize_answer(s: str) -> str:
    """Exact-match normalisation: commas, ``$``, everything up to ``#### `` and a final period removed; lower case."""
    for r in _IGNORE:
        s = re.sub(r, "", s)
    return s.strip().lower()
