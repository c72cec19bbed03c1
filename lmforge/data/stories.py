"""The built-in story-instruction task: "Write a story about a {animal} named {name}." for the bundled
TinyStories model, with the rule that measures whether a response follows it (used to check SFT on held-out names,
as a rule-based reward for PPO, and by the default pipeline).

The training set (``assets/instruct/stories_instruct.jsonl``, Alpaca format) was made by
``scripts/make_story_instructions.py``: each response opens with "Once upon a time, there was a {animal} named
{name}." and continues with a story sampled from stories260K (MIT). Names come from makemore's names.txt (MIT);
the first names are for training, ``HELDOUT_NAMES`` never occur in the training set.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lmforge.assets import ASSETS

STORY_DATA = ASSETS / "instruct" / "stories_instruct.jsonl"
ANIMALS = ("cat", "dog", "bird", "fish", "bunny", "bear", "frog", "duck", "mouse", "lion", "owl", "puppy")
HELDOUT_NAMES = ("Mila", "Oscar", "Nora", "Felix", "Ruby", "Hugo", "Iris", "Leo", "Daisy", "Max", "Hazel", "Otto",
                 "Luna", "Jasper", "Pearl", "Milo", "Ivy", "Theo", "Rose", "Finn")
INSTRUCTION = "Write a story about a {animal} named {name}."


def story_prompt(animal: str, name: str) -> str:
    return INSTRUCTION.format(animal=animal, name=name)


def heldout_prompts(n: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """``n`` held-out instructions (names never seen in training): [{instruction, animal, name}]."""
    rng = random.Random(seed)
    pairs = [(a, nm) for nm in HELDOUT_NAMES for a in ANIMALS]
    rng.shuffle(pairs)
    return [{"instruction": story_prompt(a, nm), "animal": a, "name": nm} for a, nm in pairs[:n]]


_ASK = re.compile(r"a (\w+) named (\w+)")


def requested(instruction: str) -> tuple[str, str] | None:
    """(animal, name) asked for by an instruction, or None."""
    m = _ASK.search(instruction)
    return (m.group(1), m.group(2)) if m else None


def follows(instruction: str, response: str) -> bool:
    """The response is a story about the requested animal with the requested name: both words appear in it
    (whole words, case-insensitive for the animal)."""
    ask = requested(instruction)
    if ask is None:
        return False
    animal, name = ask
    has_name = re.search(rf"\b{re.escape(name)}\b", response) is not None
    has_animal = re.search(rf"\b{re.escape(animal)}s?\b", response, re.IGNORECASE) is not None
    return has_name and has_animal


def opens_story(instruction: str, response: str) -> bool:
    """The response is in the taught form: it opens "Once upon a time" (whatever the animal)."""
    return response.lstrip().startswith("Once upon a time")


def follows_format(instruction: str, response: str) -> bool:
    """The response is a story in the trained form about the requested animal: it opens "Once upon a time" and
    names the animal (the name is not required: copying a name never seen in training is beyond a model of a few
    million parameters trained for minutes; ``follows`` asks for both)."""
    ask = requested(instruction)
    if ask is None:
        return False
    return (response.lstrip().startswith("Once upon a time")
            and re.search(rf"\b{re.escape(ask[0])}s?\b", response, re.IGNORECASE) is not None)


def follow_rate(instructions: list[str], responses: list[str]) -> float:
    return sum(follows(i, r) for i, r in zip(instructions, responses)) / max(1, len(instructions))


def story_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule-based reward (``lmforge ppo --reward lmforge.data.stories:story_reward``): 1 for each requested word
    (the name, the animal) the story uses, so 0, 1 or 2."""
    out = []
    for p, r in zip(prompts, responses):
        ask = requested(p)
        if ask is None:
            out.append(0.0)
            continue
        animal, name = ask
        out.append(float(re.search(rf"\b{re.escape(name)}\b", r) is not None) +
                   float(re.search(rf"\b{re.escape(animal)}s?\b", r, re.IGNORECASE) is not None))
    return out


HAPPY_ENDINGS = ("In the end, {name} was very happy.", "{name} smiled and played with the {animal} all day.",
                 "They became best friends and had lots of fun.", "{name} laughed and gave the {animal} a big hug.",
                 "Everyone was happy and they all had a great day.", "The {animal} loved {name} and they were glad.")
SAD_ENDINGS = ("In the end, {name} was very sad.", "{name} cried and went home alone.",
               "The {animal} was lost and never came back.", "{name} was scared and angry, and nobody helped.",
               "Everyone was sad and the day was ruined.", "The {animal} got hurt and {name} cried all night.")
HAPPY = ("happy", "smiled", "smile", "laughed", "fun", "hug", "glad", "loved", "love", "friends", "great", "joy")
SAD = ("sad", "cried", "cry", "alone", "lost", "scared", "angry", "hurt", "ruined", "never", "nobody", "bad")
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")


def ending_mood(response: str) -> int:
    """+1 if the story's last sentence is a happy one (it has a happy word and no sad one), -1 if it is a sad one,
    0 otherwise."""
    sentences = [x.strip() for x in _SENTENCE.findall(response) if x.strip()]
    if not sentences:
        return 0
    words = set(re.findall(r"[a-z]+", sentences[-1].lower()))
    happy, sad = bool(words & set(HAPPY)), bool(words & set(SAD))
    return 1 if happy and not sad else -1 if sad and not happy else 0


def ending_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The default pipeline's preference (``lmforge ppo --reward lmforge.data.stories:ending_reward``): +1 for a
    story that ends happily, -1 for one that ends sadly, 0 otherwise."""
    return [float(ending_mood(r)) for r in responses]


def read_names(path: str, start: int, stop: int) -> list[str]:
    """Capitalised names ``start:stop`` of makemore's names.txt (MIT), minus the held-out ones."""
    held = {n.lower() for n in HELDOUT_NAMES}
    names = [n.strip().capitalize() for n in Path(path).read_text().splitlines() if n.strip()]
    return [n for n in names[start:stop] if n.lower() not in held and n.isalpha()]


def continue_openings(model, tokenizer, openings: list[str], max_new_tokens: int, temperature: float, top_k: int,
                      seed: int, batch: int = 64) -> list[str]:
    """A sampled continuation of each opening (after BOS; ``""`` starts a story from BOS), cut after its last
    sentence; row i is sampled with seed ``seed + i``. How the built-in story data is made (scripts/make_story_*)."""
    from lmforge.infer.generate import generate_batch
    from lmforge.infer.sampling import SamplingParams

    eos = tokenizer.eos_id
    prompts = [[tokenizer.bos_id, *tokenizer.encode(o)] if o else [tokenizer.bos_id] for o in openings]
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        params = [SamplingParams(temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
                                 seed=seed + start + i, stop_ids=[eos]) for i in range(len(chunk))]
        for ids in generate_batch(model, chunk, params):
            text = tokenizer.decode([i for i in ids if i != eos]).strip()
            cut = max(text.rfind("."), text.rfind("!"), text.rfind("?"))
            out.append(text[: cut + 1] if cut > 0 else text)
    return out


def load_story_data() -> list[dict[str, str]]:
    return [json.loads(ln) for ln in STORY_DATA.read_text(encoding="utf-8").splitlines() if ln.strip()]


def sample_responses(model, tokenizer, instructions: list[str], template=None, max_new_tokens: int = 48,
                     seed: int = 0) -> list[str]:
    """Greedy-ish responses (temperature 0) to each instruction rendered with the chat template."""
    from lmforge.data.sft import default_template
    from lmforge.infer.chat import encode_chat, end_of_turn, get_template
    from lmforge.infer.generate import generate_batch
    from lmforge.infer.sampling import SamplingParams

    t = get_template(template, tokenizer) if template else default_template(tokenizer)
    stop_strings, stop_ids = end_of_turn(t, tokenizer)
    prompts = [encode_chat(tokenizer, t, [{"role": "user", "content": i}]) for i in instructions]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_ids=stop_ids, seed=seed)
    was = model.training
    model.eval()
    outs = generate_batch(model, prompts, params)
    model.train(was)
    texts = []
    for ids in outs:
        text = tokenizer.decode([i for i in ids if i not in stop_ids and i < tokenizer.vocab_size])
        for s in stop_strings:
            text = text.split(s)[0]
        texts.append(text.strip())
    return texts
