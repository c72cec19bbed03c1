"""Acceptance checks of fine-tuned models on examples the training never saw.

    python benchmarks/accept_sft.py stories [MODEL]     # follow rate of "Write a story about a {animal} named
                                                        # {name}." on 40 held-out names (default: the base model)
    python benchmarks/accept_sft.py identity MODEL      # answers to identity questions not in identity.json, and
                                                        # two facts (no forgetting)

MODEL is any --model path (a PEFT run directory loads as base + adapter). Greedy decoding.
"""

from __future__ import annotations

import argparse

from lmforge.data.stories import follow_rate, heldout_prompts, sample_responses
from lmforge.infer.chat import encode_chat, end_of_turn, get_template
from lmforge.infer.generate import generate_batch
from lmforge.infer.sampling import SamplingParams
from lmforge.loading import load_model_and_tokenizer

IDENTITY = ["Who am I talking to?", "What's your name?", "Please introduce yourself.",
            "Tell me about yourself in one sentence.", "Hey, what should I call you?",
            "Which company or person made you?", "What are you, exactly?", "介绍一下你自己"]
FACTS = [("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "eight")]


def stories(model: str | None) -> None:
    m, tok = load_model_and_tokenizer(model, None, "cpu")
    ins = [p["instruction"] for p in heldout_prompts(40)]
    outs = sample_responses(m, tok, ins)
    print(f"follow rate {follow_rate(ins, outs):.3f} on {len(ins)} held-out prompts ({model or 'stories260K'})")
    for i, o in list(zip(ins, outs))[:3]:
        print(f"  {i!r} -> {o[:120]!r}")


def identity(model: str, name: str) -> None:
    m, tok = load_model_and_tokenizer(model, None, "cpu")
    m.eval()
    t = get_template(None, tok)
    _, stop_ids = end_of_turn(t, tok)
    qs = IDENTITY + [q for q, _ in FACTS]
    prompts = [encode_chat(tok, t, [{"role": "user", "content": q}]) for q in qs]
    outs = generate_batch(m, prompts, SamplingParams(temperature=0, max_new_tokens=40, stop_ids=stop_ids))
    texts = [tok.decode([i for i in o if i not in stop_ids]).strip() for o in outs]
    named = sum(name in x for x in texts[: len(IDENTITY)])
    facts = sum(a.lower() in x.lower() for (_, a), x in zip(FACTS, texts[len(IDENTITY):]))
    for q, x in zip(qs, texts):
        print(f"  {q!r} -> {x[:140]!r}")
    print(f"names itself {name!r} in {named}/{len(IDENTITY)} held-out identity questions; facts kept "
          f"{facts}/{len(FACTS)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=["stories", "identity"])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--name", default="Forge", help="the name identity.json was filled with")
    a = ap.parse_args()
    if a.check == "stories":
        stories(a.model)
    else:
        identity(a.model, a.name)


if __name__ == "__main__":
    main()
