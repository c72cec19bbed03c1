"""Make lmforge/assets/instruct/stories_instruct.jsonl: "Write a story about a {animal} named {name}." with
responses that open "Once upon a time, there was a {animal} named {name}." and continue with a story sampled from
the bundled stories260K. Names: the most common names of makemore's names.txt (MIT), capitalised, minus the
held-out names. Run from the repository root:  python scripts/make_story_instructions.py [--names PATH] [--n 600]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lmforge.commands.common import load_model_and_tokenizer
from lmforge.data.stories import ANIMALS, HELDOUT_NAMES, STORY_DATA, story_prompt
from lmforge.infer.generate import generate_batch
from lmforge.infer.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="../shared/data/corpora/en/names.txt")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--tokens", type=int, default=48, help="story tokens sampled after the opening sentence")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    held = {n.lower() for n in HELDOUT_NAMES}
    names = [n.strip().capitalize() for n in Path(a.names).read_text().splitlines() if n.strip()]
    names = [n for n in names[:400] if n.lower() not in held and n.isalpha()]
    rng = random.Random(a.seed)
    pairs = [(rng.choice(ANIMALS), rng.choice(names)) for _ in range(a.n)]
    model, tok = load_model_and_tokenizer(None, None, "cpu")
    model.eval()
    openings = [f"Once upon a time, there was a {animal} named {name}." for animal, name in pairs]
    prompts = [[tok.bos_id, *tok.encode(o)] for o in openings]
    out = []
    for start in range(0, len(prompts), 64):
        params = [SamplingParams(temperature=0.8, top_k=40, max_new_tokens=a.tokens, seed=a.seed + start + i,
                                 stop_ids=[tok.eos_id]) for i in range(len(prompts[start : start + 64]))]
        out += generate_batch(model, prompts[start : start + 64], params)
    STORY_DATA.parent.mkdir(parents=True, exist_ok=True)
    with open(STORY_DATA, "w", encoding="utf-8") as f:
        for (animal, name), opening, ids in zip(pairs, openings, out):
            ids = [i for i in ids if i != tok.eos_id]
            story = tok.decode(ids).strip()
            # keep whole sentences only
            cut = max(story.rfind("."), story.rfind("!"), story.rfind("?"))
            story = story[: cut + 1] if cut > 0 else story
            rec = {"instruction": story_prompt(animal, name), "input": "", "output": f"{opening} {story}".strip()}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {len(pairs)} examples to {STORY_DATA}")


if __name__ == "__main__":
    main()
