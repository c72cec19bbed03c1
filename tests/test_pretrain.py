"""`lmforge pretrain`: recipes, overrides, outputs, resume, Ctrl-C, config errors, packed-document isolation."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch
from cli_run import refused

from lmforge.config import ModelConfig
from lmforge.model import Decoder
from lmforge.model.decoder import segment_positions
from lmforge.stages.pretrain import document_segments

SMALL = ["--recipe", "baby-gpt-shakespeare", "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2",
         "--train.eval_iters", "2", "--train.log_interval", "1"]


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300)


def rows(run) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_recipe_run_writes_metrics_plot_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    r = lmforge("pretrain", *SMALL, "--out", str(out), "--max-iters", "20", "--eval-interval", "10",
                "--save-interval", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = rows(out)
    assert all("step" in x for x in recs)
    assert [x["step"] for x in recs if "val_loss" in x] == [0, 10, 20]
    assert {x["step"] for x in recs if "train_loss" in x} >= set(range(1, 21))
    assert (out / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in out.glob("ckpt-*"))
    assert ckpts == ["ckpt-0000016", "ckpt-0000020"]  # keep_last 2; the last step is always saved
    assert (out / "ckpt-0000020" / "model.safetensors").exists() and (out / "ckpt-0000020" / "optimizer.pt").exists()
    first_val = recs[0]["val_loss"]
    assert recs[-1]["val_loss"] < first_val  # it learns
    r = lmforge("pretrain", *SMALL, "--out", str(out), "--max-iters", "25", "--resume")
    assert r.returncode == 0 and "resumed from" in r.stderr and "step 20" in r.stderr
    assert max(x["step"] for x in rows(out)) == 25
    # the run's checkpoint is an lmforge model: generate from it
    g = lmforge("generate", "--model", str(out / "ckpt-0000025"), "--prompt", "ROMEO:", "--max-new-tokens", "20",
                "--seed", "1")
    assert g.returncode == 0 and g.stdout.startswith("ROMEO:"), g.stderr


def test_a_checkpoint_names_its_tokenizers_special_tokens(tmp_path):
    """The tiny-llama preset's bos 1 / eos 2 are LLaMA's; its recipe trains a byte-level tokenizer whose end of text
    is 0 and which has no bos: the checkpoint's config now names the tokenizer's (a model section may still set
    them)."""
    from lmforge.tokenizer import load_tokenizer

    out = tmp_path / "run"
    r = lmforge("pretrain", "--recipe", "tiny-llama-shakespeare", "--model.n_layer", "1", "--model.n_embd", "32",
                "--train.eval_iters", "1", "--max-iters", "2", "--model.pad_id", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    ck = out / "ckpt-0000002"
    conf, tok = json.loads((ck / "config.json").read_text()), load_tokenizer(str(ck))
    assert (conf["bos_id"], conf["eos_id"], conf["pad_id"]) == (tok.bos_id, tok.eos_id, 5) == (None, 0, 5)


def test_ctrl_c_writes_a_final_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", *SMALL, "--out", str(out), "--max-iters",
                          "100000", "--save-interval", "100000"], stderr=subprocess.PIPE, text=True,
                         # a test run started as a background job inherits SIGINT ignored: Ctrl-C as a terminal
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any("train_loss" in ln for ln in _lines(out / "metrics.jsonl")):
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-1500:]
    ckpts = list(out.glob("ckpt-*"))
    assert len(ckpts) == 1 and "interrupted at step" in err
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == int(ckpts[0].name.split("-")[1]) > 0


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 0.001\n")
    for args, needle in [
        (["--recipe", "baby-gpt-shakespeare", "--train.lrr", "1"], "--train.lrr: unknown setting; train has: "),
        # a flag's mistake is blamed on the flag, not on the config file it is merged into
        (["--config", str(good), "--train.lr", "abc"], "error: --train.lr: expected float, got 'abc'"),
        (["--config", str(good), "--trian.lr", "1"], "error: --trian.lr: unknown section 'trian'; sections: model, "
                                                      "data, train\n"),
        (["--config", str(good), "--bogus-flag", "1"], "error: --bogus-flag: unknown flag; a setting is "
                                                        "--SECTION.KEY VALUE"),
        (["--recipe", "baby-gpt-shakespeare", "--train.precision", "fp8", "--out", str(tmp_path / "o")],
         "train.precision='fp8'"),
        (["--recipe", "baby-gpt-shakespeare", "--train.schedule", "cosin"], "train.schedule='cosin': allowed values"),
        (["--recipe", "baby-gpt-shakespeare", "--data.path", str(tmp_path / "nope.txt")], "no such file"),
        (["--config", str(bad)], "bad.yaml:"),
        (["--recipe", "baby-gpt-shakespeare", "--model.vocab_size", "10", "--out", str(tmp_path / "v")],
         "tokenizer has 65 tokens but model.vocab_size is 10"),
    ]:
        r = refused("pretrain", *args)
        assert r.returncode == 1 and needle in r.stderr, (args, r.stderr[-800:])
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_config_files_are_read_strictly_and_errors_name_file_line_and_field(tmp_path):
    """A config's errors name the file, the line and the field (``bad.yaml:3: train.lr``); a duplicate key is refused
    (YAML kept the last silently); a binary file and an empty config give one line (were a UnicodeDecodeError and
    ".: not a prepared dataset")."""
    def write(name: str, data: str | bytes):
        (tmp_path / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(tmp_path / name)

    cases = [
        (write("field.yaml", "data:\n  path: builtin:tinyshakespeare\ntrain:\n  lr: abc\n"),
         "field.yaml:4: train.lr: expected float, got 'abc'"),
        (write("dup.yaml", "train:\n  max_iters: 5\n  max_iters: 7\n"),
         "dup.yaml:3: duplicate key 'max_iters' (also on line 2)"),
        (write("unknown.yaml", "\nmodel: {}\ntrian: {}\n"), "unknown.yaml:3: unknown key 'trian'"),
        (write("bin.yaml", b"train:\n  lr: 1\n\xd0\xff\x00"), "bin.yaml:3: not UTF-8 text"),
        (write("empty.yaml", ""), "data.path is not set"),
        (write("list.yaml", "- 1\n"), "must be a mapping of sections"),
    ]
    for path, needle in cases:
        r = lmforge("pretrain", "--config", path, "--out", str(tmp_path / "o"))
        assert r.returncode == 1 and needle in r.stderr, (path, r.stderr[-800:])
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    # a flag overriding the bad value: the flag is blamed, not the file (it named the file)
    r = lmforge("pretrain", "--config", cases[0][0], "--train.lr", "x", "--out", str(tmp_path / "o"))
    assert r.stderr == "lmforge pretrain: error: --train.lr: expected float, got 'x'\n", r.stderr


def test_config_sections_and_values_of_the_wrong_shape_are_refused(tmp_path):
    """Found by an audit: ``train: 5`` was dropped silently (1,000 default steps ran), a quoted boolean made a tied
    model, ``model: [1]`` / ``eval_tasks: 5`` / a bad flag value gave a raw TypeError or ParserError, a few KB of
    nested aliases ran out of memory, deep nesting gave a RecursionError, and ``--data.path 2024-01-01`` a date."""
    head = "data: {path: builtin:tinyshakespeare, tokenizer: char, block_size: 16}\n"
    small = "model: {family: gpt2, n_layer: 1, n_embd: 16, n_head: 2, block_size: 16}\n"
    laughs = "model:\n  extra:\n    a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    cases = [
        (head + small + "train: 5\n", "c.yaml:3: train: expected a mapping of settings, got 5"),
        (head + small + "train: {eval_tasks: [5]}\n", "c.yaml:3: train.eval_tasks[0]: expected a mapping, got 5"),
        (head + "model: [1]\n", "c.yaml:2: model: expected a mapping, got [1]"),
        (head + small.replace("}", ", tie_embeddings: 'false'}"), "tie_embeddings='false': must be true or false"),
        (head + small.replace("}", ", eos_id: -5}"), "eos_id=-5: must be a token id"),
        (laughs, "c.yaml: its aliases (*name) expand it to more than 1,000,000 values"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "c.yaml: nested too deeply"),
    ]
    for text, needle in cases:
        (tmp_path / "c.yaml").write_text(text)
        r = refused("pretrain", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"))
        assert r.returncode == 1 and needle in r.stderr, (text[:80], r.stderr[-800:])
        assert len(r.stderr.strip().splitlines()) == 1
    for flags, needle in ((["--data.block_size", "-4"], "data.block_size=-4: must be >= 1"),
                          (["--data.val_fraction", "2"], "data.val_fraction=2.0: must be in [0, 1)"),
                          (["--train.lr", "[a"], "--train.lr '[a': cannot read the value"),
                          (["--train", "5", "--train.lr", "1"], "--train was given a value, not settings"),
                          (["--data.path", "2024-01-01"], "data.path='2024-01-01': no such file")):
        r = refused("pretrain", "--recipe", "baby-gpt-shakespeare", *flags, "--out", str(tmp_path / "o"))
        assert r.returncode == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_yaml_reader_keeps_merge_keys_and_lines(tmp_path):
    from lmforge.yamlfile import merge, read_yaml_file

    p = tmp_path / "c.yaml"
    p.write_text("base: &b {lr: 1, wd: 2}\ntrain:\n  <<: *b\n  lr: 3\n")
    d = read_yaml_file(p)
    assert d == {"base": {"lr": 1, "wd": 2}, "train": {"lr": 3, "wd": 2}}  # a merge key may be overridden
    assert d.lines == {"base": 1, "train": 2} and d["train"].lines["lr"] == 4
    m = merge(d, {"train": {"lr": 5}})
    assert m["train"]["lr"] == 5 and "lr" not in m["train"].lines and d["train"].lines["lr"] == 4


def test_packed_documents_do_not_leak_attention():
    eos = 0
    cfg = ModelConfig(vocab_size=40, block_size=32, n_layer=2, n_embd=32, n_head=4, multiple_of=16)
    torch.manual_seed(0)
    m = Decoder(cfg).eval()
    a, b = torch.randint(1, 40, (1, 6)), torch.randint(1, 40, (1, 9))
    a[0, -1] = eos
    x = torch.cat([a, b], 1)
    seg = document_segments(x, eos)
    assert seg.tolist() == [[0] * 6 + [1] * 9]
    with torch.no_grad():
        packed = m(x, segment_ids=seg, position_ids=segment_positions(seg))
        assert torch.allclose(packed[:, :6], m(a), atol=1e-5) and torch.allclose(packed[:, 6:], m(b), atol=1e-5)
        leaky = m(x)
        assert not torch.allclose(leaky[:, 6:], m(b), atol=1e-3)


def test_glm_blank_infilling_objective_runs(tmp_path):
    out = tmp_path / "glm"
    r = lmforge("pretrain", *SMALL, "--out", str(out), "--max-iters", "6", "--eval-interval", "3",
                "--data.objective", "glm", "--model.position", "glm2d", "--model.glm2d", "rotary")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "ckpt-0000006" / "config.json").read_text())
    assert cfg["vocab_size"] == 65 + 5 and cfg["position"] == "glm2d"
    vals = [x["val_loss"] for x in rows(out) if "val_loss" in x]
    assert len(vals) == 3 and all(v == v and v < 6 for v in vals)


def test_loss_plot_of_a_run_named_with_bytes_that_are_not_utf8(tmp_path):
    """A --out name holding bytes that are not UTF-8 (a surrogate escape in Python) trained, then failed in
    matplotlib drawing the plot's title."""
    import os

    from lmforge.train.metrics import plot_losses

    run = tmp_path / os.fsdecode(b"bad\xffname")
    run.mkdir()
    rows = [{"step": i, "train_loss": 3.0 - 0.1 * i} for i in range(1, 6)] + [{"step": 5, "val_loss": 2.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_losses(run / "metrics.jsonl", run / "loss.png") == run / "loss.png"
    assert (run / "loss.png").stat().st_size > 1000


def test_a_split_too_small_after_the_tail_split_advises_a_larger_val_fraction(tmp_path):
    """One small file: data prepare falls back to the tail split; pretrain's error advised --split-mode tail, which
    had happened already. It now names the --val-fraction that gives the validation split a window."""
    import pytest

    from lmforge.assets import STORIES260K_TOKENIZER
    from lmforge.commands.pretrain import check_prepared_data
    from lmforge.data.prepare import prepare
    from lmforge.errors import LMForgeError

    text = tmp_path / "one.txt"
    text.write_text("the cat sat on a mat and then it ran to the park with a dog. " * 60)
    idx = prepare([str(text)], str(STORIES260K_TOKENIZER), str(tmp_path / "d"), progress=False)
    assert idx["split_fallback"] == "tail"
    with pytest.raises(LMForgeError) as e:
        check_prepared_data(str(tmp_path / "d"), 128)
    msg = str(e.value)
    assert "val split holds" in msg and "--split-mode tail" not in msg and "larger --val-fraction" in msg, msg
    need = float(msg.split("--val-fraction ")[1].split()[0])
    prepare([str(text)], str(STORIES260K_TOKENIZER), str(tmp_path / "d2"), val_fraction=need, progress=False)
    check_prepared_data(str(tmp_path / "d2"), 128)  # the fraction it names is enough
    # split by document (several documents): the tail split, with a fraction that gives the split its window
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i} " + "a cat sat. " * 30}) + "\n" for i in range(40)))
    prepare([str(docs)], str(STORIES260K_TOKENIZER), str(tmp_path / "d3"), val_fraction=0.03, progress=False)
    with pytest.raises(LMForgeError, match=r"--split-mode tail and --val-fraction 0.041 or more"):
        check_prepared_data(str(tmp_path / "d3"), 300)
    prepare([str(docs)], str(STORIES260K_TOKENIZER), str(tmp_path / "d4"), val_fraction=0.041, split_mode="tail",
            progress=False)
    check_prepared_data(str(tmp_path / "d4"), 300)  # what it advises works
    # too little text for both splits (the tail split was advised, which could not help): more text, or a block
    with pytest.raises(LMForgeError, match=r"holds 7,510 tokens in all: prepare more text or lower --data.block_size"
                                           r" \(to 3,754 or less\)"):
        check_prepared_data(str(tmp_path / "d3"), 4000)
    # the train split too small after the tail split (a large --val-fraction): a smaller one
    prepare([str(docs)], str(STORIES260K_TOKENIZER), str(tmp_path / "d5"), val_fraction=0.97, split_mode="tail",
            progress=False)
    with pytest.raises(LMForgeError, match=r"train split .* a smaller --val-fraction 0.959 or less \(it was 0.97\)"):
        check_prepared_data(str(tmp_path / "d5"), 300)


def test_list_recipes_shows_each_whole_description():
    """--list-recipes printed the first comment line of each recipe only (cut mid-sentence)."""
    from lmforge.commands.pretrain import recipes

    r = lmforge("pretrain", "--list-recipes")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name, path in recipes().items():
        head = []
        for ln in path.read_text().splitlines():
            if not ln.startswith("#"):
                break
            head.append(ln.lstrip("#").strip())
        assert len(head) >= 2 and all(h in out for h in head), (name, head)
    assert "byte-level BPE tokenizer: loss curve, samples before and after" in out
    assert out.splitlines()[0].startswith("baby-gpt-shakespeare ")
