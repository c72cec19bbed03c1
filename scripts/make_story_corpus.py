"""Make lmforge/assets/stories/corpus.txt, the built-in TinyStories-style pretraining corpus of the default
pipeline: stories sampled from the bundled stories260K (karpathy/tinyllamas, MIT), half of them from BOS and half
continuing "Once upon a time, there was a {animal} named {name}." with names from makemore's names.txt (MIT), minus
the held-out names of the story task. Stories are separated by blank lines; nothing is filtered here (the
pipeline's `clean` stage does that). Run from the repository root:
    python scripts/make_story_corpus.py [--names PATH] [--stories 5000]
    python scripts/make_story_corpus.py --stories 150 --seed 7 --out lmforge/assets/stories/heldout.txt
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from lmforge.assets import ASSETS
from lmforge.data.stories import ANIMALS, continue_openings, read_names
from lmforge.loading import load_model_and_tokenizer

OUT = ASSETS / "stories" / "corpus.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", default="../shared/data/corpora/en/names.txt")
    ap.add_argument("--stories", type=int, default=5000)
    ap.add_argument("--tokens", type=int, default=200, help="tokens sampled per story")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(OUT), help="output file (heldout.txt: --stories 150 --seed 7)")
    a = ap.parse_args()
    names = read_names(a.names, 0, 3000)
    rng = random.Random(a.seed)
    model, tok = load_model_and_tokenizer(None, None, "cpu")
    model.eval()
    openings = []
    for i in range(a.stories):
        openings.append("" if i % 2 == 0 else
                        f"Once upon a time, there was a {rng.choice(ANIMALS)} named {rng.choice(names)}.")
    texts = continue_openings(model, tok, openings, a.tokens, 0.9, 50, a.seed * 100003, batch=128)
    stories = [f"{o} {t}".strip() for o, t in zip(openings, texts)]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(s.replace("\n", " ") for s in stories) + "\n", encoding="utf-8")
    print(f"wrote {len(stories)} stories, {out.stat().st_size:,} bytes to {out}")


if __name__ == "__main__":
    main()
