"""Files shipped inside the package: the stories260K model (MIT, see stories260K/LICENSE)."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
STORIES260K = ASSETS / "stories260K" / "stories260K.bin"
STORIES260K_TOKENIZER = ASSETS / "stories260K" / "tok512.bin"
TINYSHAKESPEARE = ASSETS / "tinyshakespeare.txt"  # public domain text, via karpathy/char-rnn (MIT)
RECIPES = ASSETS.parent / "recipes"


def default_model(path: str | None) -> str:
    """A command's ``--model``, or the bundled stories260K when none is given."""
    return path or str(STORIES260K)
