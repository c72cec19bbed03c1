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
from pathlib import Path

from lmforge.assets import ASSETS
from lmforge.commands.common import load_model_and_tokenizer
from lmforge.data.stories import ANIMALS, HAPPY_ENDINGS, HELDOUT_NAMES, SAD_ENDINGS, ending_mood, story_prompt
from lmforge.infer.generate import generate_batch
from lmforge.infer.sampling import SamplingParams

OUT = ASSETS / "instruct" / "stories_preferences.jsonl"



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="../shared/data/corpora/en/names.txt")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    held = {n.lower() for n in HELDOUT_NAMES}
    names = [n.strip().capitalize() for n in Path(a.names).read_text().splitlines() if n.strip()]
    names = [n for n in names[400:1400] if n.lower() not in held and n.isalpha()]
    rng = random.Random(a.seed)
    pairs = [(rng.choice(ANIMALS), rng.choice(names)) for _ in range(a.n)]
    model, tok = load_model_and_tokenizer(None, None, "cpu")
    model.eval()
    openings = [f"Once upon a time, there was a {animal} named {name}." for animal, name in pairs]
    prompts = [[tok.bos_id, *tok.encode(o)] for o in openings]
    out = []
    for start in range(0, len(prompts), 64):
        params = [SamplingParams(temperature=0.8, top_k=40, max_new_tokens=a.tokens, seed=a.seed * 7919 + start + i,
                                 stop_ids=[tok.eos_id]) for i in range(len(prompts[start : start + 64]))]
        out += generate_batch(model, prompts[start : start + 64], params)
    with open(OUT, "w", encoding="utf-8") as f:
        for (animal, name), opening, ids in zip(pairs, openings, out):
            story = tok.decode([i for i in ids if i != tok.eos_id]).strip()
            cut = max(story.rfind("."), story.rfind("!"), story.rfind("?"))
            best = f"{opening} {story[: cut + 1] if cut > 0 else story}".strip()
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
