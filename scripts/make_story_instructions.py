"""Make lmforge/assets/instruct/stories_instruct.jsonl: "Write a story about a {animal} named {name}." with
responses that open "Once upon a time, there was a {animal} named {name}." and continue with a story sampled from
the bundled stories260K. Names: the most common names of makemore's names.txt (MIT), capitalised, minus the
held-out names. Run from the repository root:  python scripts/make_story_instructions.py [--names PATH] [--n 600]
"""

from __future__ import annotations

import argparse
import json
import random

from lmforge.data.stories import ANIMALS, STORY_DATA, continue_openings, read_names, story_prompt
from lmforge.loading import load_model_and_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="../shared/data/corpora/en/names.txt")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--tokens", type=int, default=48, help="story tokens sampled after the opening sentence")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    names = read_names(a.names, 0, 400)
    rng = random.Random(a.seed)
    pairs = [(rng.choice(ANIMALS), rng.choice(names)) for _ in range(a.n)]
    model, tok = load_model_and_tokenizer(None, None, "cpu")
    model.eval()
    openings = [f"Once upon a time, there was a {animal} named {name}." for animal, name in pairs]
    stories = continue_openings(model, tok, openings, a.tokens, 0.8, 40, a.seed)
    STORY_DATA.parent.mkdir(parents=True, exist_ok=True)
    with open(STORY_DATA, "w", encoding="utf-8") as f:
        for (animal, name), opening, story in zip(pairs, openings, stories):
            rec = {"instruction": story_prompt(animal, name), "input": "", "output": f"{opening} {story}".strip()}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {len(pairs)} examples to {STORY_DATA}")


if __name__ == "__main__":
    main()
