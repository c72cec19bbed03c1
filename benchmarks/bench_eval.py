"""`lmforge eval` speed against peers on the same model, data and threads (ratios from one run).

    python benchmarks/bench_eval.py                       # SmolLM2-135M from ~/.cache/lmforge/smollm2, shared data
    python benchmarks/bench_eval.py --limit 4 --ppl-tokens 512   # a quick check that everything runs

- MMLU (the shared dev files, K-shot, each question's demonstrations are the other dev questions of its subject:
  the layout where questions share least), ARC-Easy zero-shot, and ARC-Easy with the same first K training questions
  as demonstrations for every question (the layout of MMLU's test split, whose questions all take their subject's
  dev questions): examples/s of lmforge against lm-evaluation-harness' ``hf`` model on the model exported
  to transformers (when ``lm_eval`` is installed; same prompts as local harness tasks), else against a plain
  transformers loop scoring each (context, choice) in its own forward (no prefix caching). Accuracy of both printed.
- Perplexity: tokens/s of lmforge's rolling windows against the transformers sliding-window loop (the HF perplexity
  guide) on the same text, window and stride.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from lmforge.eval import EvalConfig, evaluate
from lmforge.eval.tasks import load_arc, load_mmlu

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
SMOL = Path.home() / ".cache" / "lmforge" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def export_hf(model, out: Path):
    import transformers

    from lmforge.checkpoint import model_state_dict
    from lmforge.interop.hf import write_hf_dir

    write_hf_dir(out, model.cfg, model_state_dict(model))
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@torch.no_grad()
def loop_choices(hf, tok, records: list[dict], max_len: int) -> list[int]:
    """Plain transformers log-likelihood loop: every (context, continuation) in its own forward, no cache."""
    preds = []
    for rec in records:
        scores = []
        for c in rec["choices"]:
            ctx, cont = rec["prompt"], " " + c
            c_ids = tok.encode(ctx)
            whole = tok.encode(ctx + cont)
            cont_ids = whole[len(c_ids):]
            inp = (c_ids + cont_ids)[-(max_len + 1):][:-1]
            lp = torch.log_softmax(hf(torch.tensor([inp])).logits[0, -len(cont_ids):].float(), -1)
            scores.append(float(lp[torch.arange(len(cont_ids)), torch.tensor(cont_ids)].sum()))
        preds.append(max(range(len(scores)), key=lambda j: (scores[j], -j)))
    return preds


def dedup_mmlu(src: Path, dst: Path, min_rows: int) -> Path:
    """Copies of the MMLU csv files without repeated rows, and only those with at least ``min_rows`` questions (the
    shared college_physics dev file holds one question twice; the harness' first_n sampler then lacks demonstrations
    for it): both sides read the copies."""
    dst.mkdir()
    for f in sorted(src.glob("*.csv")):
        rows = list(dict.fromkeys(tuple(r) for r in csv.reader(f.open(encoding="utf-8", newline=""))))
        if len(rows) - 1 < min_rows:  # the header row and the questions
            print(f"{f.name}: {len(rows) - 1} distinct questions, fewer than {min_rows}: left out")
            continue
        with dst.joinpath(f.name).open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return dst


def harness_tasks(folder: Path, mmlu: Path, arc: Path, subjects: list[str], arc_train: Path) -> list[str]:
    """Local lm-evaluation-harness task YAMLs with lmforge's (= the harness') MMLU and ARC prompts; ``lmf_arc_fs``
    takes its demonstrations from ``arc_train`` (the first ones, as ``--select first_n``)."""
    names = []
    for s in subjects:
        name = f"lmf_mmlu_{s}"
        desc = f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\\n\\n"
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: csv\ndataset_kwargs:\n  data_files: {{test: {mmlu / (s + '_dev.csv')}}}\n"
            "test_split: test\nfewshot_split: test\nfewshot_config:\n  sampler: first_n\n"
            "output_type: multiple_choice\n"
            f'description: "{desc}"\n'
            'doc_to_text: "{{question.strip()}}\\nA. {{choice0}}\\nB. {{choice1}}\\nC. {{choice2}}\\nD. {{choice3}}'
            '\\nAnswer:"\ndoc_to_choice: ["A", "B", "C", "D"]\ndoc_to_target: answer\n'
            "metric_list:\n  - metric: acc\n")
        names.append(name)
    arc_doc = ('output_type: multiple_choice\ndoc_to_text: "Question: {{question.stem}}\\nAnswer:"\n'
               "doc_to_choice: \"{{question.choices | map(attribute='text') | list}}\"\n"
               "doc_to_target: \"{{(question.choices | map(attribute='label') | list).index(answerKey)}}\"\n"
               "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "lmf_arc.yaml").write_text(
        f"task: lmf_arc\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {arc}}}\ntest_split: test\n"
        + arc_doc)
    (folder / "lmf_arc_fs.yaml").write_text(
        f"task: lmf_arc_fs\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {arc}, train: {arc_train}}}\n"
        "test_split: test\nfewshot_split: train\nfewshot_config:\n  sampler: first_n\n" + arc_doc)
    return names


def run_harness(hf, hf_tok, tasks_dir: Path, tasks: list[str], limit: int,
                shots: int) -> tuple[float, float, dict[tuple[str, int], list[float]]]:
    """(mean accuracy over ``tasks``, seconds, each question's choice log-likelihoods by (task, doc_id)) of
    lm-evaluation-harness' ``hf`` model at batch size 1."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=1)
    tm = TaskManager(include_path=str(tasks_dir))
    t = time.perf_counter()
    r = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit, task_manager=tm,
                                log_samples=True)
    dt = time.perf_counter() - t
    lls = {(n, int(x["doc_id"])): [float(c[0]) for c in x["filtered_resps"]] for n in tasks for x in r["samples"][n]}
    return sum(r["results"][n]["acc,none"] for n in tasks) / len(tasks), dt, lls


def agreement(records: list[dict], keys: list[tuple[str, int]], lls: dict) -> str:
    """How often lmforge's choice (``records``, keyed like the harness' samples by ``keys``) is the harness', and
    how close a question's choice log-likelihoods are. (transformers' tokenizer made from a GGUF can split text
    differently from the model's own, e.g. SmolLM2's "\\n\\n" before a digit: such questions differ more.)"""
    same, worst, close, n = 0, 0.0, 0, 0
    for rec, key in zip(records, keys):
        if key not in lls:
            continue
        theirs = lls[key]
        n += 1
        same += rec["choice"] == max(range(len(theirs)), key=lambda j: (theirs[j], -j))
        diff = max(abs(a - b) for a, b in zip(rec["scores"], theirs))
        close += diff <= 1e-3
        worst = max(worst, diff)
    return (f"same choice as the harness on {same}/{n} questions; log-likelihoods within 1e-3 on {close}, "
            f"at most {worst:.1e} apart")


@torch.no_grad()
def hf_sliding_window(hf, ids: list[int], window: int, stride: int) -> float:
    """The transformers perplexity guide's loop: windows of `window` tokens moved by `stride`, only new targets."""
    x = torch.tensor([ids])
    nll, count, prev = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - prev
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg] = -100
        n = int((labels[:, 1:] != -100).sum())
        nll += float(hf(inp, labels=labels).loss) * n
        count += n
        prev = end
        if end == len(ids):
            break
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SMOL))
    ap.add_argument("--mmlu", default=str(SHARED / "mmlu_dev"))
    ap.add_argument("--arc", default=str(SHARED / "arc" / "arc_easy_dev.jsonl"))
    ap.add_argument("--shots", type=int, default=4, help="MMLU demonstrations (the dev files hold 5 per subject)")
    ap.add_argument("--limit", type=int, default=285, help="MMLU questions (and ARC questions)")
    ap.add_argument("--arc-train", default=str(SHARED / "arc" / "arc_easy_train.jsonl"))
    ap.add_argument("--arc-shots", type=int, default=5, help="ARC with this many demonstrations, the first ones of "
                    "--arc-train for every question (as MMLU's test split takes its subject's dev questions); 0: skip")
    ap.add_argument("--arc-fewshot-limit", type=int, default=100, help="questions of the few-shot ARC case")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--baseline", default="auto", choices=["auto", "harness", "loop"])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cases", nargs="+", default=["mmlu", "arc", "arc_fewshot", "perplexity"],
                    choices=["mmlu", "arc", "arc_fewshot", "perplexity"], help="which cases to run (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.model, None, "cpu")
    use_harness = args.baseline == "harness"
    if args.baseline == "auto":
        try:
            import lm_eval  # noqa: F401

            use_harness = True
        except ImportError:
            use_harness = False
    out: dict = {"model": args.model, "threads": torch.get_num_threads(), "baseline": "harness" if use_harness
                 else "transformers loop"}
    with tempfile.TemporaryDirectory() as tmp:
        hf = export_hf(model, Path(tmp) / "hf")
        args.mmlu = str(dedup_mmlu(Path(args.mmlu), Path(tmp) / "mmlu", args.shots + 1))
        cases = {"mmlu": EvalConfig("mmlu", args.mmlu, fewshot_data=args.mmlu, shots=args.shots, limit=args.limit),
                 "arc": EvalConfig("arc", args.arc, limit=args.limit)}
        if args.arc_shots and "arc_fewshot" in args.cases:
            cases[f"arc_{args.arc_shots}shot"] = EvalConfig("arc", args.arc, fewshot_data=args.arc_train,
                                                            shots=args.arc_shots, limit=args.arc_fewshot_limit)
        cases = {k: v for k, v in cases.items() if k in args.cases or k.startswith("arc_")}
        mine = {}
        for name, cfg in cases.items():
            t = time.perf_counter()
            res = evaluate(model, tok, cfg)
            mine[name] = (res, time.perf_counter() - t)
        base, agree = {}, {}
        if use_harness:
            from transformers import AutoTokenizer

            p = Path(args.model)
            hf_tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name) if p.suffix == ".gguf" \
                else AutoTokenizer.from_pretrained(p)
            docs = load_mmlu(Path(args.mmlu))[: args.limit]
            subjects = list(dict.fromkeys(d["subject"] for d in docs))
            per_subject = max(1, math.ceil(args.limit / max(len(subjects), 1)))
            tdir = Path(tmp) / "tasks"
            tdir.mkdir()
            names = harness_tasks(tdir, Path(args.mmlu), Path(args.arc), subjects, Path(args.arc_train))
            n_arc = len(load_arc(Path(args.arc)))
            for name, cfg in cases.items():
                tasks, limit, n = ((names, per_subject, sum(min(per_subject, sum(d["subject"] == s for d in docs))
                                                           for s in subjects)) if name == "mmlu" else
                                   (["lmf_arc_fs" if cfg.shots else "lmf_arc"], cfg.limit, min(cfg.limit, n_arc)))
                acc, dt, lls = run_harness(hf, hf_tok, tdir, tasks, limit, cfg.shots)
                base[name] = (acc, n / dt)
                recs = mine[name][0].records
                if name == "mmlu":  # doc ids count within each subject's file
                    seen: dict[str, int] = {}
                    keys = []
                    for r in recs:
                        keys.append((f"lmf_mmlu_{r['subject']}", seen.get(r["subject"], 0)))
                        seen[r["subject"]] = seen.get(r["subject"], 0) + 1
                else:
                    keys = [(tasks[0], i) for i in range(len(recs))]
                agree[name] = agreement(recs, keys, lls)
        else:
            for name in cases:
                res, _ = mine[name]
                t = time.perf_counter()
                preds = loop_choices(hf, tok, res.records, model.cfg.block_size)
                dt = time.perf_counter() - t
                acc = sum(p == r["gold"] for p, r in zip(preds, res.records)) / len(preds)
                base[name] = (acc, len(preds) / dt)
        for name in cases:
            res, dt = mine[name]
            eps = res.n / dt
            out[name] = {"n": res.n, "lmforge_acc": res.metrics["acc"], "lmforge_examples_per_s": eps,
                         "baseline_acc": base[name][0], "baseline_examples_per_s": base[name][1],
                         "speedup": eps / base[name][1]}
            print(f"{name}: lmforge {eps:.2f} ex/s (acc {res.metrics['acc']:.4f}), {out['baseline']} "
                  f"{base[name][1]:.2f} ex/s (acc {base[name][0]:.4f}): {eps / base[name][1]:.2f}x")
            if name in agree:
                out[name]["agreement"] = agree[name]
                print(f"{name}: {agree[name]}")
        # perplexity on the bundled tinyshakespeare
        if "perplexity" in args.cases:
            from lmforge.assets import TINYSHAKESPEARE

            text_ids = tok.encode(Path(TINYSHAKESPEARE).read_text(encoding="utf-8")[: args.ppl_tokens * 8])
            ids = text_ids[: args.ppl_tokens]
            txt = Path(tmp) / "ppl.txt"
            txt.write_text(tok.decode(ids), encoding="utf-8")
            window = min(args.window, model.cfg.block_size)
            t = time.perf_counter()
            stride = min(args.stride, window)
            res = evaluate(model, tok, EvalConfig("perplexity", str(txt), context=window, stride=stride))
            dt_mine = time.perf_counter() - t
            t = time.perf_counter()
            ppl_hf = hf_sliding_window(hf, tok.encode(txt.read_text(encoding="utf-8")), window, stride)
            dt_hf = time.perf_counter() - t
            out["perplexity"] = {"tokens": res.n, "lmforge_ppl": res.metrics["ppl"],
                                 "lmforge_tokens_per_s": res.n / dt_mine, "transformers_ppl": ppl_hf,
                                 "transformers_tokens_per_s": res.n / dt_hf, "speedup": dt_hf / dt_mine}
            print(f"perplexity: lmforge {res.n / dt_mine:.0f} tok/s (ppl {res.metrics['ppl']:.3f}), transformers loop "
                  f"{res.n / dt_hf:.0f} tok/s (ppl {ppl_hf:.3f}): {dt_hf / dt_mine:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
