"""Files shipped inside the package, each with its licence beside it: the stories260K model (MIT), tinyshakespeare
(public domain, via char-rnn, MIT) and the built-in story data of the default pipeline (MIT, see
``stories/NOTICE.md`` and ``instruct/NOTICE.md``). ``builtin:NAME`` names one of ``BUILTIN`` wherever a path is
accepted by the pipeline and ``lmforge pretrain``."""

from pathlib import Path

from lmforge.errors import LMForgeError

ASSETS = Path(__file__).resolve().parent
STORIES260K = ASSETS / "stories260K" / "stories260K.bin"
STORIES260K_TOKENIZER = ASSETS / "stories260K" / "tok512.bin"
TINYSHAKESPEARE = ASSETS / "tinyshakespeare.txt"  # public domain text, via karpathy/char-rnn (MIT)
RECIPES = ASSETS.parent / "recipes"

BUILTIN: dict[str, Path] = {
    "tinyshakespeare": TINYSHAKESPEARE,
    "stories260K": STORIES260K,
    "stories_corpus": ASSETS / "stories" / "corpus.txt",  # TinyStories-style text sampled from stories260K
    "stories_heldout": ASSETS / "stories" / "heldout.txt",  # more such stories, never trained on
    "stories_instruct": ASSETS / "instruct" / "stories_instruct.jsonl",  # "Write a story about a {animal} named..."
    "stories_preferences": ASSETS / "instruct" / "stories_preferences.jsonl",  # ranked lists for reward/DPO/PPO
    "stories_prompts": ASSETS / "instruct" / "stories_prompts.txt",  # the instructions alone, for PPO rollouts
    "stories_heldout_prompts": ASSETS / "instruct" / "stories_heldout_prompts.txt",  # names never trained on
}


def builtin_path(spec: str, what: str = "path") -> Path:
    """The file a ``builtin:NAME`` spec names (one line naming the known ones if none)."""
    name = spec.split(":", 1)[1]
    if name not in BUILTIN:
        raise LMForgeError(f"{what}={spec!r}: no built-in file {name!r}; built in: {', '.join(sorted(BUILTIN))}")
    return BUILTIN[name]


def local_path(spec: str | Path, what: str = "path") -> Path:
    """A data path as users give it: ``builtin:NAME`` (one of BUILTIN) or a file path."""
    spec = str(spec)
    return builtin_path(spec, what) if spec.startswith("builtin:") else Path(spec)


def default_model(path: str | None) -> str:
    """A command's ``--model``, or the bundled stories260K when none is given."""
    return path or str(STORIES260K)
