"""A directory's ``MANIFEST.json``: the size and sha256 of every file, written with the directory and verified on
every load (lmforge checkpoints, training checkpoints, ``lmforge quantize`` directories). A file already verified
with the same size, mtime, inode and ctime is not hashed again (the cache is ``~/.cache/lmforge/verified.json``).
No torch here: the lean runtime verifies its directories too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmforge.files import read_cache, write_cache

MANIFEST = "MANIFEST.json"
VERIFIED = "verified.json"  # the cache of files already hashed


# ---- manifests: size + sha256 of every file, verified on load ------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """``MANIFEST.json``: {file name: {"size": bytes, "sha256": hex}} of every file in ``directory``."""
    entries = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
               for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(entries, indent=2) + "\n")


def _stat_key(path: Path) -> list[int]:
    """What a verified file must still have for its hash to be trusted again: size, mtime, inode and ctime (which
    no one can set back: a file rewritten and given its old mtime with ``touch -d`` or ``os.utime`` is hashed again)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _remember(digests: dict[str, str]) -> None:
    """Record files whose hash was just computed (best effort: a read-only cache directory is fine)."""
    cache = read_cache(VERIFIED)
    for name, digest in digests.items():
        try:
            cache[name] = [*_stat_key(Path(name)), digest]
        except OSError:
            continue
    if len(cache) > 4096:  # keep the newest entries only
        cache = dict(list(cache.items())[-2048:])
    write_cache(VERIFIED, cache)


def plain_name(name: str) -> bool:
    """A file name of the directory itself: no path separators, nothing absolute, not . or .."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def verify_manifest(directory: Path, required: bool = False, skip: frozenset[str] = frozenset()) -> str | None:
    """None if every file listed in ``directory/MANIFEST.json`` (except ``skip``) has its size and sha256, else what
    is wrong. A missing manifest is fine unless ``required``. Entries may be a bare sha256 (older training
    checkpoints)."""
    m = directory / MANIFEST
    if not m.is_file():
        return "no MANIFEST.json (incomplete)" if required else None
    try:
        manifest = json.loads(m.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError):
        return "MANIFEST.json is corrupt"
    cache = read_cache(VERIFIED)
    hashed: dict[str, str] = {}
    for name, entry in manifest.items():
        if name in skip:
            continue
        if not plain_name(name):
            return f"MANIFEST.json names {name!r}, not a file of the checkpoint (corrupt)"
        digest, size = (entry, None) if isinstance(entry, str) else (
            entry.get("sha256"), entry.get("size")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
                and (size is None or (type(size) is int and size >= 0))):
            return f"MANIFEST.json: the entry of {name} is not a size and sha256 (corrupt)"
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        key = _stat_key(p)
        if size is not None and key[0] != size:
            return f"{name} has {key[0]:,} bytes, its manifest says {size:,} (truncated or damaged)"
        full = str(p.resolve())
        if cache.get(full) == [*key, digest]:
            continue
        if sha256_file(p) != digest:
            return f"{name} fails its checksum (damaged)"
        hashed[full] = digest
    if hashed:
        _remember(hashed)
    return None


__all__ = ["MANIFEST", "plain_name", "sha256_file", "verify_manifest", "write_manifest"]
