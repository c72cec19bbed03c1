"""Make lmforge/assets/instruct/stories_preferences.jsonl, the built-in preference data of the default pipeline:
ranked lists {instruction, responses: [best, middle, worst]} for "Write a story about a {animal} named {name}.",
ranked by how the story ends. Each story opens "Once upon a time, there was a {animal} named {name}." and continues
with text sampled from the bundled stories260K (MIT); the best response adds a happy last sentence, the middle one
is the story as sampled, the worst adds a sad last sentence (``HAPPY_ENDINGS`` / ``SAD_ENDINGS`` of
``lmforge.data.stories``). A reward model learns from it to prefer stories that end happily; DPO and PPO move a
policy that way (measured by ``ending_reward``). Names: makemore's names.txt (MIT), entries 400-1400 (the SFT set
uses the first 400), minus the held-out names. Run from the repository root:
    python scripts/make_story_preferences.py [--names PATH] [--n 500]
"""

from __future__ import annotations

import argparse
import json
import random

from lmforge.assets import ASSETS
from lmforge.data.stories import (
    ANIMALS,
    HAPPY_ENDINGS,
    SAD_ENDINGS,
    continue_openings,
    ending_mood,
    read_names,
    story_prompt,
)
from lmforge.loading import load_model_and_tokenizer

OUT = ASSETS / "instruct" / "stories_preferences.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="../shared/data/corpora/en/names.txt")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    names = read_names(a.names, 400, 1400)
    rng = random.Random(a.seed)
    pairs = [(rng.choice(ANIMALS), rng.choice(names)) for _ in range(a.n)]
    model, tok = load_model_and_tokenizer(None, None, "cpu")
    model.eval()
    openings = [f"Once upon a time, there was a {animal} named {name}." for animal, name in pairs]
    stories = continue_openings(model, tok, openings, a.tokens, 0.8, 40, a.seed * 7919)
    with open(OUT, "w", encoding="utf-8") as f:
        for (animal, name), opening, story in zip(pairs, openings, stories):
            best = f"{opening} {story}".strip()
            while ending_mood(best) != 0 and len(best) > len(opening):  # the middle one ends neither way
                best = best[: max(best.rfind(".", 0, len(best) - 1), best.rfind("!", 0, len(best) - 1)) + 1]
            happy = rng.choice(HAPPY_ENDINGS).format(name=name, animal=animal)
            sad = rng.choice(SAD_ENDINGS).format(name=name, animal=animal)
            best, middle, worst = f"{best} {happy}", best, f"{best} {sad}"
            rec = {"instruction": story_prompt(animal, name), "responses": [best, middle, worst]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {len(pairs)} ranked lists to {OUT}")


if __name__ == "__main__":
    main()
