"""`lmforge pipeline` as users run it: the default pipeline's stages at a small size end with a loadable model, a
report and the effects each stage is there for; a second run reuses every stage; changing a stage's flags reruns
it and the stages after it; --from, --only, --dry-run, --list-stages and --print-default; errors name file and line.
The full default pipeline (about 6 minutes) runs with LMFORGE_SLOW_TESTS=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.errors import LMForgeError
from lmforge.pipeline import presets, read_pipeline
from lmforge.pipeline.runner import marker_product
from lmforge.pipeline.spec import Ref, apply_overrides, parse_pipeline, stage_argv, stage_hash

SMALL = Path(__file__).parent / "data" / "pipeline_small.yaml"


def lmforge(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def last_line(r: subprocess.CompletedProcess) -> str:
    return r.stdout.strip().splitlines()[-1]


def checks(out: Path) -> dict[str, bool]:
    rep = json.loads((out / "report.json").read_text())
    return {f"{s['name']}: {c['what']}": c["ok"] for s in rep["stages"] for c in s["checks"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    r = lmforge("pipeline", str(SMALL), "--out", str(out))
    return out, r


def test_small_pipeline_runs_every_stage_with_its_effect(run):
    out, r = run
    assert last_line(r).startswith("pipeline done: 8 stages, 8 run and 0 reused")
    assert f"lmforge chat --model {out / 'final'}" in r.stdout
    for name in ("tokenizer", "clean", "prepare", "pretrain", "sft", "reward", "dpo", "quantize"):
        assert f"] {name}" in r.stdout
        assert (out / "logs" / f"{name}.log").is_file()
    got = checks(out)
    # the effects a seconds-long configuration can show (the full default also raises the preference: slow test)
    for what in ("pretrain: pretraining lowers validation loss",
                 "sft: SFT raises the held-out instruction-following rate",
                 "reward: reward model ranks held-out pairs better than chance",
                 "dpo: DPO prefers the better response of held-out pairs",
                 "dpo: at bounded KL (<= 10 nats)",
                 "quantize: quantization keeps perplexity within 5%"):
        assert got[what], (what, got)
    rep = json.loads((out / "report.json").read_text())
    sft = next(s for s in rep["stages"] if s["name"] == "sft")
    assert sft["before"]["follow_rate"] < sft["after"]["follow_rate"]
    assert len(sft["after"]["samples"]) == 2 and sft["after"]["samples"][0]["response"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert "Write a story about a" in html
    # the final model is the int4 one and loads as a --model
    assert (out / "final" / "quantization.json").is_file()
    g = lmforge("generate", "--model", str(out / "final"), "--prompt", "Once upon a time", "--max-new-tokens", "8")
    assert g.stdout.strip()


def test_second_run_reuses_and_changed_flag_reruns_downstream(run):
    out, _ = run
    r = lmforge("pipeline", str(SMALL), "--out", str(out))
    assert "8 stages, 0 run and 8 reused" in last_line(r)
    r = lmforge("pipeline", str(SMALL), "--out", str(out), "--dpo.beta", "0.3", "--dry-run")
    planned = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("[") and " run " in ln]
    assert planned == ["dpo", "quantize"], r.stdout
    r = lmforge("pipeline", str(SMALL), "--out", str(out), "--from", "quantize")
    assert "1 run and 7 reused" in last_line(r)
    r = lmforge("pipeline", str(SMALL), "--out", str(out), "--only", "reward")
    assert "] reward           done" in r.stdout and "1 run and 7 reused" in last_line(r)
    shutil.rmtree(out / "quantize")  # a deleted output is made again
    r = lmforge("pipeline", str(SMALL), "--out", str(out))
    assert "1 run and 7 reused" in last_line(r) and "] quantize         done" in r.stdout
    with open(out / "quantize" / "model.safetensors", "r+b") as f:  # a damaged one too (it was reused, "cached")
        f.truncate(1000)
    r = lmforge("pipeline", str(SMALL), "--out", str(out))
    assert "] quantize         output damaged (model.safetensors has 1,000 bytes" in r.stdout, r.stdout
    assert "1 run and 7 reused" in last_line(r) and "] quantize         done" in r.stdout


def test_measure_settings_are_checked_first_and_a_change_measures_again(run):
    """`--measure.prompts builtin:nosuch` (or a follow function that does not exist) ran with exit 0 when every stage
    was cached, and a valid change kept the cached stages' old measurements in the report."""
    out, _ = run
    for flag, value, says in [("--measure.prompts", "builtin:nosuch", "builtin:nosuch"),
                              ("--measure.follow", "nosuchmod:fn", "measure.follow: 'nosuchmod:fn': cannot import")]:
        r = subprocess.run([sys.executable, "-m", "lmforge", "pipeline", str(SMALL), "--out", str(out), flag, value],
                           capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and says in lines[0], r.stdout[-2000:] + r.stderr[-2000:]
    r = lmforge("pipeline", str(SMALL), "--out", str(out), "--measure.samples", "1")
    assert "0 run and 8 reused" in last_line(r), r.stdout[-2000:]
    sft = next(s for s in json.loads((out / "report.json").read_text())["stages"] if s["name"] == "sft")
    assert len(sft["after"]["samples"]) == 1 and sft["after"]["follow_rate"] is not None
    r = lmforge("pipeline", str(SMALL), "--out", str(out))  # back to the spec's 2 samples: measured again
    sft = next(s for s in json.loads((out / "report.json").read_text())["stages"] if s["name"] == "sft")
    assert "0 run and 8 reused" in last_line(r) and len(sft["after"]["samples"]) == 2


def test_a_copied_run_directory_uses_its_own_outputs(run, tmp_path):
    out, _ = run
    moved = tmp_path / "copy"
    shutil.copytree(out, moved, symlinks=True)
    r = lmforge("pipeline", str(SMALL), "--out", str(moved), "--from", "dpo", "--dry-run")
    dpo = next(ln for ln in r.stdout.splitlines() if "] dpo" in ln)
    assert f"--model {moved / 'sft'} " in dpo, dpo  # not the original run's sft
    r = lmforge("pipeline", str(SMALL), "--out", str(moved))
    assert "8 stages, 0 run and 8 reused" in last_line(r)
    rep = json.loads((moved / "report.json").read_text())
    assert all(Path(s["product"]).is_relative_to(moved) for s in rep["stages"]), [s["product"] for s in rep["stages"]]
    # markers written before held the path as that run named it
    old = {"product": "runs/pipeline/pretrain/ckpt-0000500"}
    assert marker_product(moved, "pretrain", old) == moved / "pretrain" / "ckpt-0000500"
    assert marker_product(moved, "sft", {"product": "/abs/runs/pipeline/sft"}) == moved / "sft"


def test_interrupted_training_stage_resumes(run, tmp_path):
    out, _ = run
    marker = out / ".pipeline" / "dpo.json"
    m = json.loads(marker.read_text())
    marker.write_text(json.dumps({"hash": m["hash"], "status": "running"}))
    try:
        r = lmforge("pipeline", str(SMALL), "--out", str(out), "--dry-run")
        line = next(ln for ln in r.stdout.splitlines() if "] dpo" in ln)
        assert " resume " in line and line.rstrip().endswith("--resume")
    finally:
        marker.write_text(json.dumps(m))


def test_cli_lists_and_prints_default(tmp_path):
    r = lmforge("pipeline", "--list-stages")
    assert {ln.split()[0] for ln in r.stdout.splitlines()} >= {"tokenizer", "clean", "prepare", "pretrain", "sft",
                                                               "reward", "dpo", "ppo", "rejection-sample", "eval",
                                                               "quantize"}
    r = lmforge("pipeline", "--print-default")
    own = tmp_path / "mine.yaml"
    own.write_text(r.stdout)
    p = read_pipeline(own)
    assert [s.name for s in p.stages] == ["tokenizer", "clean", "prepare", "pretrain", "sft", "reward", "dpo",
                                          "quantize"]
    assert "default" in presets()
    r = lmforge("pipeline", "--dry-run", "--out", str(tmp_path / "x"))
    assert last_line(r) == "pipeline dry run: 8 stages, 8 would run, 0 complete"
    assert not (tmp_path / "x" / "final").exists()


def test_every_preset_parses_and_plans(tmp_path):
    for name in presets():
        r = lmforge("pipeline", "--preset", name, "--dry-run", "--out", str(tmp_path / name))
        assert "would run" in last_line(r), name


def _parse(text: str, tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    return read_pipeline(f)


def test_errors_name_file_line_and_field(tmp_path):
    with pytest.raises(LMForgeError, match=r"p\.yaml:3: unknown stage command 'sfft'"):
        _parse("stages:\n  - tokenizer: {input: a.txt}\n  - sfft: {}\n", tmp_path)
    with pytest.raises(LMForgeError, match=r"p\.yaml:2: model: from: 'sft' is not an earlier stage"):
        _parse("stages:\n  - dpo: {model: {from: sft}}\n  - sft: {}\n", tmp_path)
    with pytest.raises(LMForgeError, match=r"p\.yaml: measure\.colour: unknown"):
        _parse("measure: {colour: red}\nstages:\n  - sft: {}\n", tmp_path)
    with pytest.raises(LMForgeError, match=r"p\.yaml:3: a second stage named 'sft'"):
        _parse("stages:\n  - sft: {}\n  - sft: {}\n", tmp_path)
    with pytest.raises(LMForgeError, match=r"p\.yaml:2: invalid YAML"):
        _parse("stages:\n  - sft: {model: [}\n", tmp_path)
    # a stage's flags or measure settings of the wrong shape (a TypeError; kl_max: abc was taken)
    with pytest.raises(LMForgeError, match=r"p\.yaml:2: tokenizer: expected a mapping of flags, got 5"):
        _parse("stages:\n  - tokenizer: 5\n", tmp_path)
    with pytest.raises(LMForgeError, match=r"p\.yaml:2: measure\.kl_max: expected float, got 'abc'"):
        _parse("measure:\n  kl_max: abc\nstages:\n  - sft: {}\n", tmp_path)
    with pytest.raises(LMForgeError, match=r"p\.yaml:1: measure: expected a mapping"):
        _parse("measure: 5\nstages:\n  - sft: {}\n", tmp_path)


def test_stage_flags_are_checked_before_anything_runs(tmp_path):
    """A flag the stage's command does not know, a value of the wrong type or a setting its config refuses fails
    --dry-run naming the YAML line (they passed it and failed at run time as 'bad flags (see LOG)'); a stage may not
    set its own output, which the pipeline overrode silently."""
    from lmforge.pipeline.spec import check_flags

    def refused(text: str, pattern: str, overrides: dict | None = None) -> None:
        with pytest.raises(LMForgeError, match=pattern):
            p = _parse(text, tmp_path)
            apply_overrides(p, overrides or {})
            check_flags(p)

    tok = "stages:\n  - tokenizer: {input: builtin:stories_corpus, kind: char, %s}\n"
    refused(tok % "vocab-size: 64, nosuch: 1", r"p\.yaml:2: tokenizer: .*unrecognized arguments: --nosuch "
                                 r"\(see lmforge tokenizer train --help\)")
    # a misspelt required flag said "the following arguments are required: --vocab-size", never naming the typo
    refused(tok % "vocab-sise: 64", r"p\.yaml:2: tokenizer: .*unrecognized arguments: --vocab-sise \(did you mean "
                                    r"--vocab-size\?\)")
    refused(tok % "vocab-size: abc", r"p\.yaml:2: tokenizer: .*--vocab-size: invalid int value: 'abc'")
    refused(tok % "output: mine, vocab-size: 64", r"p\.yaml:2: tokenizer: output: set by the pipeline")
    sft = tok % "vocab-size: 64" + "  - sft: {model: {from: tokenizer}, data: x.json%s}\n"
    refused(sft % ", train: {lr: abc}", r"p\.yaml:3: sft: --train\.lr: expected float, got 'abc'")
    refused(sft % ", nosuch: {a: 1}", r"p\.yaml:3: sft: --nosuch\.a: unknown section 'nosuch'")
    refused(sft % "", r"--sft\.out: sft: out: set by the pipeline", {"sft": {"out": "elsewhere"}})
    refused(sft % "", r"p\.yaml:3: sft: --colour: unknown flag", {"sft": {"colour": "red"}})
    refused(sft % ", max_iter: 3",  # (argparse took it as --max-iters)
            r"p\.yaml:3: sft: .*unrecognized arguments: --max-iter \(did you mean --max-iters\?\)")
    refused(sft % "", r"--measure\.kl_max: expected float, got 'abc'", {"measure": {"kl_max": "abc"}})
    p = _parse(sft % ", train: {lr: 1e-4}", tmp_path)
    check_flags(p)  # a valid pipeline passes, its `from:` inputs not made yet
    assert not (tmp_path / "runs").exists()
    r = subprocess.run([sys.executable, "-m", "lmforge", "pipeline", str(tmp_path / "p.yaml"), "--dry-run",
                        "--sft.train.lr", "abc", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"lmforge pipeline: error: {tmp_path / 'p.yaml'}:3: sft: --train.lr: expected float, got 'abc' "
        "(see lmforge sft --help)"]


def test_argv_overrides_and_hash(tmp_path):
    d = yaml.safe_load("""
stages:
  - tokenizer: {input: builtin:stories_corpus, vocab_size: 64, kind: char}
  - sft: {model: {from: tokenizer}, data: "builtin:stories_instruct,other.json", packing: true, train: {lr: 1e-4}}
""")
    p = parse_pipeline(d, "t")
    sft = p.stage("sft")
    assert sft.args[("model",)] == Ref("tokenizer")
    argv = stage_argv(sft, {"tokenizer": Path("/r/tok")}, None, Path("/r/sft"))
    assert argv[:3] == ["sft", "--model", "/r/tok"]
    assert argv[3] == "--data" and argv[4].endswith("stories_instruct.jsonl,other.json")
    assert "--packing" in argv and float(argv[argv.index("--train.lr") + 1]) == 1e-4
    assert argv[-2:] == ["--out", "/r/sft"]
    tok_argv = stage_argv(p.stage("tokenizer"), {}, None, Path("/r/tok"))
    assert "--vocab-size" in tok_argv
    h1 = stage_hash(sft, {"tokenizer": "aaa"}, None)
    assert stage_hash(sft, {"tokenizer": "bbb"}, None) != h1  # an upstream change invalidates
    apply_overrides(p, {"sft": {"train": {"lr": 2e-4}}, "measure": {"samples": 1}})
    assert sft.args[("train", "lr")] == 2e-4 and p.measure.samples == 1
    assert stage_hash(sft, {"tokenizer": "aaa"}, None) != h1
    apply_overrides(p, {"base": "some/model"})
    assert [s.name for s in p.stages] == ["sft"]
    assert stage_argv(p.stage("sft"), {}, p.base, Path("/r/sft"))[2] == "some/model"


@pytest.mark.skipif(os.environ.get("LMFORGE_SLOW_TESTS", "") in ("", "0"),
                    reason="the full default pipeline takes about 6 minutes (set LMFORGE_SLOW_TESTS=1)")
def test_default_pipeline_meets_every_check(tmp_path):
    r = lmforge("pipeline", "--out", str(tmp_path / "run"), timeout=1800)
    got = checks(tmp_path / "run")
    assert all(got.values()), got
    met, total = map(int, re.search(r"(\d+)/(\d+) checks met", last_line(r)).groups())
    assert met == total == 7 and last_line(r).startswith("pipeline done: 8 stages, 8 run")


TINY = """
measure: {prompts: null, tasks: [{task: perplexity, data: "builtin:stories_heldout", limit: 5}]}
stages:
  - tokenizer: {input: builtin:stories_heldout, vocab-size: 300, kind: llama-bpe}
  - prepare: {inputs: [builtin:stories_heldout], tokenizer: {from: tokenizer}, val-fraction: 0.1,
              doc-separator: "\\n\\n"}
  - pretrain:
      model: {preset: tiny-llama, n_layer: 1, n_embd: 32, n_head: 2, n_kv_head: 1, block_size: 256, dropout: 0.0}
      data: {path: {from: prepare}, block_size: 256}
      train: {max_iters: 6, batch_size: 4, eval_interval: 3, eval_iters: 2, save_interval: 3}
  - sft: {model: {from: pretrain}, data: builtin:stories_instruct, max-iters: 3, train: {batch_size: 2}}
"""


def test_pipeline_under_torchrun_trains_like_one_process(tmp_path):
    import torch
    from safetensors.torch import load_file

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # float32 on both sides: precision auto picks bf16 autocast here, where a batch split over two processes rounds
    # each half's weight gradient to bf16 (one process rounds the whole sum once): the runs then end 2.9e-6 apart
    # after 6 steps on a quiet machine, and once 1.8e-5 on a loaded one. In float32 they end 3.7e-9 apart.
    fp32 = ("--pretrain.train.precision", "fp32")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lmforge",
           "pipeline", str(cfg), "--out", str(tmp_path / "two"), *fp32]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert last_line(r).startswith("pipeline done: 4 stages, 4 run and 0 reused")
    assert r.stdout.count("pipeline done") == 1  # one report, from the first process
    lmforge("pipeline", str(cfg), "--out", str(tmp_path / "one"), "--pretrain.train.batch_size", "8", *fp32)
    two = load_file(str(tmp_path / "two" / "pretrain" / "ckpt-0000006" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "pretrain" / "ckpt-0000006" / "model.safetensors"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-5)
    assert (tmp_path / "two" / "final" / "config.json").is_file()
    rep = json.loads((tmp_path / "two" / "report.json").read_text())
    assert rep["stages"][2]["after"]["perplexity_ppl"] > 1  # measure.tasks: any lmforge eval task


def test_hash_follows_file_contents_not_times(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("some text")
    p = parse_pipeline({"stages": [{"clean": {"inputs": [str(data)]}}]}, "t")
    h = stage_hash(p.stages[0], {}, None)
    data.write_text("some text")  # written again, same bytes
    os.utime(data, (1, 1))
    assert stage_hash(p.stages[0], {}, None) == h
    data.write_text("other text")
    assert stage_hash(p.stages[0], {}, None) != h


def test_print_default_states_the_time_the_readme_states():
    """`--print-default` said about 6 minutes where the README says about 5 (measured 3 min 13 s)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    said = re.search(r"in about (\d+) minutes on a 2-core\s+CPU", readme)
    assert said, "the README's time of the main job"
    r = lmforge("pipeline", "--print-default")
    assert r.returncode == 0, r.stderr
    assert re.findall(r"about (\d+) minutes", r.stdout.splitlines()[0]) == [said.group(1)]


def test_list_presets_shows_each_whole_description():
    """`--list-presets` printed each preset's first comment line, cut mid-sentence; now its first paragraph."""
    r = lmforge("pipeline", "--list-presets")
    assert r.returncode == 0, r.stderr
    shown = " ".join(r.stdout.split())
    for name, path in presets().items():
        lines = path.read_text().splitlines()
        n = next(i for i, ln in enumerate(lines) if not ln.startswith("#") or not ln[1:].strip())
        words = " ".join(w for ln in lines[:n] for w in ln[1:].split())
        assert f"{name} {words}" in shown, name
