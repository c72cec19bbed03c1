"""lm-evaluation-harness model adapter: run any harness task on an lmforge model (needs ``pip install lm_eval``).

    import lm_eval
    import lmforge.eval.harness  # registers the model name "lmforge"
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=ckpt/", tasks=["arc_easy"])

or from the shell, the harness' own command line with ``lmforge`` registered (every ``lm_eval`` flag works):

    python -m lmforge.eval.harness --model lmforge --model_args pretrained=ckpt/ --tasks arc_easy

Log-likelihoods go through lmforge's scorer (requests sharing a context reuse its KV cache), rolling
log-likelihoods through its rolling windows, generation through its batched generator.
"""

from __future__ import annotations

import warnings

import torch

from lmforge.errors import LMForgeError
from lmforge.loading import load_model_and_tokenizer

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the harness
    raise LMForgeError("lmforge.eval.harness needs lm-evaluation-harness: pip install lm_eval") from e

from lmforge.eval.scoring import Group, Scorer, encode_pair
from lmforge.infer.sampling import cut_at_stop


@register_model("lmforge")
class LMForgeLM(LM):
    """``model_args``: pretrained (any lmforge ``--model`` path), tokenizer, device, max_gen_toks, add_bos,
    batch_tokens. From Python, ``LMForgeLM(model=decoder, tokenizer=tok)`` wraps a loaded model."""

    def __init__(self, pretrained: str | None = None, tokenizer=None, device: str | None = "auto",
                 max_gen_toks: int = 256, add_bos: bool = False, batch_tokens: int | None = None, model=None,
                 batch_size=None, **_: object) -> None:
        super().__init__()
        if model is None:
            model, tokenizer = load_model_and_tokenizer(pretrained, tokenizer, _device(device))
        elif tokenizer is None or isinstance(tokenizer, str):
            raise LMForgeError("LMForgeLM(model=...) needs the tokenizer object too")
        self.scorer = Scorer(model, tokenizer, batch_tokens=None if batch_tokens is None else int(batch_tokens),
                             add_bos=_flag(add_bos))
        self.scorer.want_greedy = True
        self.model, self.tok = model, tokenizer
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Requests with the same context form one group: the context runs once, each continuation on its cache."""
        by_ctx: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_ctx.setdefault(r.args[0], []).append(i)
        groups, where = [], []
        for ctx, idx in by_ctx.items():
            pairs = [encode_pair(self.tok, ctx, requests[i].args[1], self.scorer.add_bos) for i in idx]
            # continuations that merge with the context's last token split it differently: their own group each
            for (c_ids, cont), i in zip(pairs, idx):
                if groups and where[-1][0] == ctx and groups[-1].context == c_ids:
                    groups[-1].continuations.append(cont)
                    where[-1][1].append(i)
                else:
                    groups.append(Group(c_ids, [cont]))
                    where.append((ctx, [i]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for (_, idx), res in zip(where, self.scorer.score_greedy(groups)):
            for i, (lp, greedy) in zip(idx, res):
                out[i] = (lp, greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [-self.scorer.rolling(self.tok.encode(r.args[0]))[0] for r in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lmforge.infer.generate import generate_batch
        from lmforge.infer.sampling import SamplingParams

        out = [""] * len(requests)
        bos = [self.tok.bos_id] if self.scorer.add_bos and self.tok.bos_id is not None else []
        jobs = []  # (request index, prompt ids, sampling, stop strings)
        for i, r in enumerate(requests):
            ctx, kw = r.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temp = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            room = self.model.cfg.block_size - n
            ids = (bos + self.tok.encode(ctx))[-max(room, 1):]
            stop_ids = [self.tok.eos_id] if self.tok.eos_id is not None else []
            jobs.append((i, ids, SamplingParams(temperature=temp, top_p=1.0, max_new_tokens=n, stop_ids=stop_ids,
                                                stop=until, seed=0), until))
        jobs.sort(key=lambda j: -len(j[1]))  # batches of similar lengths: little padding
        for b in range(0, len(jobs), self.scorer.max_batch):
            part = jobs[b : b + self.scorer.max_batch]
            news = generate_batch(self.model, [j[1] for j in part], [j[2] for j in part], self.tok)
            for (i, _, _, until), new in zip(part, news, strict=True):
                out[i] = cut_at_stop(self.tok.decode(new), until)
        return out


def _device(name: str | None) -> str:
    """The harness passes ``cuda`` unless told otherwise: fall back to the CPU (with a warning) where there is none."""
    if not name or name == "auto":
        return "auto"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {name!r} asked for but CUDA is not available: running on the CPU", stacklevel=2)
        return "cpu"
    return str(name)


def _flag(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def main() -> None:
    """``lm_eval``'s command line, with the ``lmforge`` model registered (``python -m lmforge.eval.harness ...``)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
