"""`lmforge self-instruct`: ROUGE-L against rouge_score, the paper's filters, prompt and response parsing, the
driver with a scripted backend (kept instructions, resume, stops) and the command on the bundled stories260K."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.assets import STORIES260K, STORIES260K_TOKENIZER
from lmforge.data.self_instruct import (
    CLASSIFY_HEADER,
    INSTANCE_FILTERS,
    INSTRUCTION_FILTERS,
    INSTRUCTION_HEADER,
    OUTPUT_FIRST_HEADER,
    Generated,
    ModelBackend,
    Request,
    RougeIndex,
    SelfInstructConfig,
    Task,
    classify_demos,
    classify_prompt,
    cut_at_stop,
    filter_instances,
    instance_prompt,
    instruction_filter,
    instruction_prompt,
    lcs_length,
    load_seed_tasks,
    parse_input_first,
    parse_instructions,
    parse_output_first,
    parse_yes_no,
    pick_prompt_instructions,
    rouge_l,
    rouge_tokenize,
    run_self_instruct,
)
from lmforge.data.sft import read_conversations
from lmforge.errors import LMForgeError

SMALL_SEEDS = Path(__file__).parent / "data" / "seed_tasks_small.jsonl"
SHARED_SEEDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "seed_tasks.jsonl"


def _shared_or_skip() -> Path:
    if not SHARED_SEEDS.is_file():
        pytest.skip(f"{SHARED_SEEDS} absent (the paper's 175 seed tasks)")
    return SHARED_SEEDS


# ---- ROUGE-L ------------------------------------------------------------------------------------------------

WORDS = ["the", "a", "cat", "cats", "running", "runs", "ran", "Dog", "dog's", "2024", "x1", "é", "naïve", "ﬁle",
         "co-op", "U.S.A.", "", " ", "\n", "!!", "K", "İstanbul", "straße", "give", "given", "giving", "list", "of"]


def _random_text(rng: random.Random) -> str:
    return rng.choice([" ", "  ", "\t", "-", ", "]).join(rng.choice(WORDS) for _ in range(rng.randint(0, 14)))


def test_rouge_l_equals_rouge_score_on_many_pairs():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    rng = random.Random(0)
    pairs = [(_random_text(rng), _random_text(rng)) for _ in range(600)]
    if SHARED_SEEDS.is_file():
        texts = [t.instruction for t in load_seed_tasks(SHARED_SEEDS)]
        pairs += [(rng.choice(texts), rng.choice(texts)) for _ in range(300)]
        pairs += [(t, t.upper()) for t in texts[:20]]
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    stemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    stem = stemmed._tokenizer._stemmer.stem
    for a, b in pairs:
        assert rouge_l(a, b) == pytest.approx(plain.score(a, b)["rougeL"].fmeasure, abs=1e-9), (a, b)
        assert rouge_l(a, b, stem) == pytest.approx(stemmed.score(a, b)["rougeL"].fmeasure, abs=1e-9), (a, b)
    index = RougeIndex([b for _, b in pairs[:200]])
    for a, _ in pairs[:50]:
        assert index.scores(a) == [rouge_l(a, b) for _, b in pairs[:200]]


def test_rouge_tokenize_and_lcs():
    assert rouge_tokenize("Don't STOP-me, x2!") == ["don", "t", "stop", "me", "x2"]
    assert rouge_tokenize("naïve café") == ["na", "ve", "caf"]
    rng = random.Random(1)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
        assert lcs_length(a, b) == dp[-1][-1] == lcs_length(b, a)


# ---- instruction filters, prompts, parsing ----------------------------------------------------------------------


@pytest.mark.parametrize("text,reason", [
    ("Summarize the article.", None),
    ("Sort it", "too_short"),
    ("Write " + "very " * 150 + "long.", "too_long"),
    ("Describe the image in detail.", "blacklisted"),
    ("Draw a cat with three legs.", "blacklisted"),
    ("Open the FILES folder and count.", "blacklisted"),
    ("Tell me how to go to the station.", "blacklisted"),
    ("Explain the mapping between keys and values.", None),  # "map" only as a word
    ("Name a filename extension for text.", None),
    ("Write a program that adds two numbers.", "write_a_program"),
    ("- Give me three colours please.", "starts_with_punctuation"),
    ("\"Quote\" the sentence back to me.", "starts_with_punctuation"),
    ("Éxplain the rules of chess briefly.", "starts_with_non_ascii"),
])
def test_instruction_filters(text, reason):
    assert instruction_filter(text) == reason


def test_instruction_prompt_has_eight_numbered_instructions_six_seeds_two_machine():
    seeds = [f"Seed task number {i}:" for i in range(20)]
    machine = [f"Machine task number {i}" for i in range(5)]
    rng = random.Random(0)
    chosen = pick_prompt_instructions(rng, seeds, machine)
    assert len(chosen) == 8 and sum(c in machine for c in chosen) == 2 and sum(c in seeds for c in chosen) == 6
    assert sum(c in machine for c in pick_prompt_instructions(rng, seeds, machine[:1])) == 1
    assert all(c in seeds for c in pick_prompt_instructions(rng, seeds, []))
    prompt = instruction_prompt(chosen)
    assert prompt.startswith(INSTRUCTION_HEADER) and prompt.startswith("Come up with a series of tasks:\n\n1. ")
    lines = prompt[len(INSTRUCTION_HEADER):].split("\n")
    assert [ln.split(".")[0] for ln in lines] == [str(i) for i in range(1, 10)]
    assert lines[-1] == "9." and lines[0] == f"1. {chosen[0].rstrip(':')}"


def test_parse_numbered_instructions():
    text = " give me a joke.\n10. Name   two rivers.\n11.Write a haiku\n   continued here\n 12 . Add 3.5 and 2\n13. "
    assert parse_instructions(text) == ["Give me a joke.", "Name two rivers.", "Write a haiku continued here",
                                        "Add 3.5 and 2"]
    assert parse_instructions("") == [] and parse_instructions("\n\n") == []


def test_classification_prompt_and_answers():
    seeds = load_seed_tasks(SMALL_SEEDS)
    demos = classify_demos(seeds, 6, random.Random(0))
    assert len(demos) == 6 and sum(t.is_classification for t in demos) == 3
    p = classify_prompt("Is the word a noun?", demos)
    assert p.startswith(CLASSIFY_HEADER) and p.endswith("Task: Is the word a noun?\nIs it classification?")
    assert p.count("Is it classification? Yes\n") == 3 and p.count("Is it classification? No\n") == 3
    assert [parse_yes_no(a) for a in (" Yes", "yes.", " No", "NO", "maybe", "")] == [True, True, False, False,
                                                                                      None, None]


def test_instance_prompts_output_first_and_input_first():
    clf = Task("Tell whether the number is even or odd.", [("17", "Odd")], True)
    gen = Task("Translate into French.", [("Good morning", "Bonjour")], False)
    noin = Task("Suggest a bakery name.", [("", "Crust and Crumb")], False)
    p = instance_prompt("Is the sentence a question?", True, [clf])
    assert p.startswith(OUTPUT_FIRST_HEADER)
    assert "Task: Tell whether the number is even or odd.\nClass label: Odd\nInput: 17\n\n" in p
    assert p.endswith("Task: Is the sentence a question?\n")
    p = instance_prompt("Reverse the word.", False, [gen, noin])
    assert "Task: Translate into French.\nExample 1\nInput: Good morning\nOutput: Bonjour\n\n" in p
    assert "Task: Suggest a bakery name.\nOutput: Crust and Crumb\n\n" in p and p.endswith("Task: Reverse the word.\n")


def test_parse_instances_both_orders():
    text = "Example 1\nInput: 2 + 2\nOutput: 4\nExample 2\nInput: a list\nof two lines\nOutput:\nline one\nline two\n"
    assert parse_input_first(text) == [("2 + 2", "4"), ("a list\nof two lines", "line one\nline two")]
    assert parse_input_first("Input: x\nOutput: y\nInput: z\nOutput: w") == [("x", "y"), ("z", "w")]
    assert parse_input_first("Output: Crust and Crumb") == [("", "Crust and Crumb")]
    assert parse_input_first("Example 1\nSentence: Hi there.\nOutput: Hello.") == [("Sentence: Hi there.", "Hello.")]
    assert parse_input_first("Example 1\nInput: no output yet") == [("no output yet", "")]
    assert parse_input_first("Once upon a time there was a dog.") == []
    text = "Class label: Positive\nInput: I love it.\nClass label: Negative\nReview: Awful.\nSo bad.\nClass label: Odd"
    assert parse_output_first(text) == [("I love it.", "Positive"), ("Review: Awful.\nSo bad.", "Negative"),
                                        ("", "Odd")]
    assert parse_output_first("no labels at all") == []
    assert parse_output_first("Class label: 1\nOutput: Yes\nInput: No") == [("", "1")]
    assert parse_output_first("Class label: A\nInput: x\nOutput: y") == [("x", "A")]


def test_instance_filters_with_counts():
    pairs = [("a", "1"), ("", ""), ("same", "same"), ("b", "2:"), ("a", "1"), ("c", "3"), ("c", "4"), ("", "x"),
             ("", "y"), ("d", "5"), ("e", "6"), ("f", "7"), ("g", "8")]
    counts: dict[str, int] = {}
    kept = filter_instances(pairs, max_instances=4, counts=counts)
    assert kept == [("a", "1"), ("", "x"), ("", "y"), ("d", "5")]  # same empty input, other outputs: not a conflict
    assert counts == {"empty_output": 1, "input_equals_output": 1, "incomplete": 1, "duplicate": 1,
                      "conflicting": 2, "over_max": 3}


def test_seed_files_load():
    seeds = load_seed_tasks(SMALL_SEEDS)
    assert len(seeds) == 12 and sum(t.is_classification for t in seeds) == 4
    shared = load_seed_tasks(_shared_or_skip())
    assert len(shared) == 175 and all(t.instances for t in shared)


def test_bad_seed_record_names_its_line(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Fine task here.", "instances": []}\n{"instruction": 3}\n')
    with pytest.raises(LMForgeError, match=r"seeds.jsonl:2: field 'instruction'"):
        load_seed_tasks(bad)


# ---- the driver with a scripted backend ---------------------------------------------------------------------------

VOCAB = [f"{c}{v}{d}" for c in "bdfklmnprstvz" for v in "aeiou" for d in "gmrx"]


class ScriptedBackend:
    """Answers like a well-behaved model: numbered instructions (some that each filter drops), Yes for tasks that
    say "classify", and instances in the order asked (with a duplicate and a conflict)."""

    context = 100_000

    def __init__(self) -> None:
        self.calls: list[str] = []

    def count_tokens(self, text: str) -> int:
        return len(text) // 4

    def generate(self, requests):
        out = []
        for r in requests:
            self.calls.append(r.prompt)
            rng = random.Random(r.prompt + str(r.seed))
            if r.prompt.startswith(INSTRUCTION_HEADER):
                words = " ".join(rng.sample(VOCAB, 5))
                first = r.prompt.split("\n1. ")[1].split("\n")[0]  # copies a prompt instruction: too similar
                text = (f" Classify {words} as good or bad.\n10. Explain {' '.join(rng.sample(VOCAB, 6))} simply."
                        f"\n11. {first}\n12. Draw the plot of a story.\n13. Hi\n14. ¿Qué es {words}?"
                        '\n15. "Quoted" words go first here.\n16. Cut off')
                out.append(Generated(text, True))
            elif r.prompt.startswith(CLASSIFY_HEADER):
                out.append(Generated(" Yes" if "Task: Classify" in r.prompt.rsplit("\n\n", 1)[-1] else " No", False))
            elif r.prompt.startswith(OUTPUT_FIRST_HEADER):
                out.append(Generated("Class label: good\nInput: a fine day\nClass label: bad\nInput: a fine day\n"
                                     "Class label: bad\nInput: rain\n", False))
            else:
                out.append(Generated("Example 1\nInput: 2 + 2\nOutput: 4\nExample 2\nInput: 2 + 2\nOutput: 4\n"
                                     "Example 3\nInput: 3\nOutput: 3\nExample 4\nInput: 5\nOutput: 6", False))
        return out


def _cfg(**kw) -> SelfInstructConfig:
    return SelfInstructConfig(**{"num": 6, "batch_size": 2, **kw})


def test_driver_keeps_classifies_and_writes_sft_data(tmp_path):
    backend = ScriptedBackend()
    rep = run_self_instruct(SMALL_SEEDS, tmp_path / "run", _cfg(), backend, progress=False, log=lambda m: None)
    f = rep["instruction_filters"]
    assert rep["kept"] == 6 and rep["stopped"] is None
    assert rep["generated"] == rep["kept"] + sum(f.values())
    for name in ("truncated", "too_short", "blacklisted", "starts_with_punctuation", "starts_with_non_ascii",
                 "too_similar"):
        assert f[name] > 0, name
    records = [json.loads(ln) for ln in (tmp_path / "run" / "machine_instructions.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert {r["is_classification"] for r in records} == {True, False}
    assert rep["classification"]["yes"] == sum(r["is_classification"] for r in records)
    for r in records:
        assert r["instruction"].startswith(("Classify", "Explain")) and len(r["most_similar"]) == 10
        assert max(r["most_similar"].values()) < 0.7
        want = [{"input": "rain", "output": "bad"}] if r["is_classification"] else [
            {"input": "2 + 2", "output": "4"}, {"input": "5", "output": "6"}]
        assert r["instances"] == want
    n_clf = sum(r["is_classification"] for r in records)
    inst = rep["instances"]
    assert inst["conflicting"] == 2 * n_clf and inst["duplicate"] == 6 - n_clf
    assert inst["input_equals_output"] == 6 - n_clf and inst["kept"] == rep["examples"] == 2 * 6 - n_clf
    convs = read_conversations(tmp_path / "run" / "data.json")
    assert len(convs) == rep["examples"]
    assert convs[0].messages[-1]["role"] == "assistant"
    assert json.loads((tmp_path / "run" / "report.json").read_text())["kept"] == 6
    # machine-generated instructions enter later prompts: 2 of 8 once there are some
    later = [p for p in backend.calls if p.startswith(INSTRUCTION_HEADER)][-1]
    assert sum(f"{r['instruction']}\n" in later for r in records) == 2


def test_driver_is_seeded_and_resumes_without_redoing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_self_instruct(SMALL_SEEDS, a, _cfg(num=4), ScriptedBackend(), progress=False, log=lambda m: None)
    run_self_instruct(SMALL_SEEDS, b, _cfg(num=4), ScriptedBackend(), progress=False, log=lambda m: None)
    for name in ("machine_instructions.jsonl", "data.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    first = (a / "machine_instructions.jsonl").read_text()
    with pytest.raises(LMForgeError, match="not empty; pass --resume"):
        run_self_instruct(SMALL_SEEDS, a, _cfg(num=8), ScriptedBackend(), progress=False, log=lambda m: None)
    with open(a / "machine_instructions.jsonl", "a") as fh:  # a round interrupted after its append
        fh.write('{"instruction": "half a rec')
    backend = ScriptedBackend()
    rep = run_self_instruct(SMALL_SEEDS, a, _cfg(num=8), backend, resume=True, progress=False, log=lambda m: None)
    text = (a / "machine_instructions.jsonl").read_text()
    assert rep["kept"] == 8 and text.startswith(first) and len(text.splitlines()) == 8
    rounds_before = json.loads((b / "report.json").read_text())["rounds"]
    assert rep["rounds"] > rounds_before
    n_prompts = sum(p.startswith(INSTRUCTION_HEADER) for p in backend.calls)
    assert n_prompts == 2 * (rep["rounds"] - rounds_before)  # only the new rounds were generated


def test_driver_stops_on_patience_and_max_rounds(tmp_path):
    class Junk(ScriptedBackend):
        def generate(self, requests):
            return [Generated("Once upon a time", True) for _ in requests]

    rep = run_self_instruct(SMALL_SEEDS, tmp_path / "p", _cfg(patience=3), Junk(), progress=False, log=lambda m: None)
    assert rep["kept"] == 0 and rep["rounds"] == 3 and "--patience 3" in rep["stopped"]
    assert rep["instruction_filters"]["truncated"] == rep["generated"] == 6
    assert json.loads((tmp_path / "p" / "data.json").read_text()) == []
    rep = run_self_instruct(SMALL_SEEDS, tmp_path / "m", _cfg(num=100, max_rounds=2), ScriptedBackend(),
                            progress=False, log=lambda m: None)
    assert rep["rounds"] == 2 and 0 < rep["kept"] < 100 and "--max-rounds 2" in rep["stopped"]


def test_report_keys_cover_every_filter(tmp_path):
    rep = run_self_instruct(SMALL_SEEDS, tmp_path / "r", _cfg(num=2), ScriptedBackend(), progress=False,
                            log=lambda m: None)
    assert set(rep["instruction_filters"]) == set(INSTRUCTION_FILTERS)
    assert set(INSTANCE_FILTERS) <= set(rep["instances"])


# ---- the command ------------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def _check_ending(r: subprocess.CompletedProcess, out: Path) -> None:
    rows = json.loads((out / "data.json").read_text())
    assert isinstance(rows, list)
    if rows:
        assert r.returncode == 0, r.stderr
        last = r.stdout.strip().splitlines()[-1]
        assert last.startswith("self-instruct done: ") and f"{out.name}/data.json" in last
        assert len(read_conversations(out / "data.json")) == len(rows)
    else:  # stories260K keeps no examples in a round or two: not "done" with exit 0 (sft then found no records)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
            f"lmforge self-instruct: error: {out.name}/data.json: no examples kept (")


def test_command_on_stories260k_runs_resumes_and_refuses(tmp_path):
    seeds = SHARED_SEEDS if SHARED_SEEDS.is_file() else SMALL_SEEDS
    small = ["--batch-size", "4", "--max-new-tokens", "48", "--instance-max-new-tokens", "48", "--no-progress"]
    r = run_cli("self-instruct", "--seeds", str(seeds), "--num", "5", "--out", "tmp", "--max-rounds", "1", *small,
                cwd=tmp_path)
    out = tmp_path / "tmp"
    assert "instructions generated:" in r.stdout and "same input, different outputs" in r.stdout
    _check_ending(r, out)
    rep = json.loads((out / "report.json").read_text())
    assert rep["rounds"] == 1 and rep["settings"]["num"] == 5
    kept = (out / "machine_instructions.jsonl").read_text()

    r = run_cli("self-instruct", "--seeds", str(seeds), "--num", "5", "--out", "tmp", *small, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "lmforge self-instruct: error: tmp: not empty; pass --resume to continue the run in it, or choose "
        "another --out"]

    r = run_cli("self-instruct", "--seeds", str(seeds), "--num", "9", "--out", "tmp", "--resume", "--max-rounds",
                "2", *small, cwd=tmp_path)
    assert "resuming" in r.stderr
    _check_ending(r, out)
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["rounds"] == 2 and rep2["generated"] >= rep["generated"]
    assert (out / "machine_instructions.jsonl").read_text().startswith(kept)
    # resumed with another model (a forgotten --model): refused (its data was mixed in, the report named it alone)
    other = tmp_path / "other.bin"
    other.write_bytes(STORIES260K.read_bytes())
    r = run_cli("self-instruct", "--seeds", str(seeds), "--num", "9", "--out", "tmp", "--resume", "--model",
                str(other), "--tokenizer", str(STORIES260K_TOKENIZER), *small, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        f"lmforge self-instruct: error: tmp: made with --model {STORIES260K} (this run: {other}); resume with the "
        "same --model, or use another --out"), r.stderr
    r = run_cli("self-instruct", "--seeds", str(seeds), "--num", "9", "--out", "tmp2", "--presence-penalty", "nan",
                *small, cwd=tmp_path)  # (NaN logits: every sequence ran to its limit, nothing kept)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "lmforge self-instruct: error: --presence-penalty nan: must be a finite number"], r.stderr


def test_model_backend_stops_truncates_and_fits_the_context(stories):
    assert cut_at_stop("a\n\nb\n16. c", ["\n16.", "\n\n"]) == "a"
    assert cut_at_stop("abc", ["x"]) == "abc"
    model, tok = stories
    backend = ModelBackend(model, tok, batch_size=2)
    long_prompt = "Once upon a time " * 200  # longer than the 512-token context: its end is kept
    reqs = [Request("Once upon a time", [], 6), Request("Once upon a time", [" "], 40),
            Request(long_prompt, ["\n"], 8, temperature=0.8, seed=1)]
    free, stopped, long = backend.generate(reqs)
    assert free.truncated and len(tok.encode(free.text)) >= 5
    assert not stopped.truncated and " " not in stopped.text
    assert "\n" not in long.text
    assert backend.count_tokens("Once upon a time") == len(tok.encode("Once upon a time")) + 1  # BOS
