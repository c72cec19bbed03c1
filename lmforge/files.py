"""File-system helpers shared by every writer of outputs (no torch: data tools import this too)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from lmforge.errors import LMForgeError


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_modes(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the permissions of what the user creates
    (0666/0777 minus the umask): ``mkdtemp`` makes directories private and safetensors writes files 0600, which
    left model directories unreadable to another user (a server's account, a shared cache)."""
    mask = current_umask()
    if path.is_dir():
        for d, _, files in os.walk(path):
            os.chmod(d, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(d, f), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# the files of a model directory (weights, config, adapter, quantization, checksums): what --overwrite may replace
MODEL_FILES = ("config.json", "model.safetensors", "quantization.json", "adapter_config.json",
               "adapter_model.safetensors", "MANIFEST.json")


def check_output(out: Path, overwrite: bool, sources: list[Path], flag: str) -> None:
    """Before any work: refuse (one line) an output that would replace what is being read (the same path, or a
    directory holding it), an existing non-empty output unless ``overwrite``, and with it a non-empty directory
    that holds no model (--overwrite deleted whatever it held)."""
    target = out.resolve()
    for src in sources:
        if src is not None and src.exists() and (target == src.resolve() or target in src.resolve().parents):
            raise LMForgeError(f"{flag} {out}: it would replace {src}, which is being read; write elsewhere")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise LMForgeError(f"{flag} {out}: exists; pass --overwrite to replace it")
    if out.is_dir() and any(out.iterdir()) and not any((out / n).is_file() for n in MODEL_FILES):
        raise LMForgeError(f"{flag} {out}: holds no model (none of {', '.join(MODEL_FILES)}); --overwrite replaces a "
                           "model directory only: empty it or choose another")
    check_replaceable(out, flag)


def check_output_file(out: str | Path, overwrite: bool, sources: list[Path | None] = (),
                      flag: str = "--output") -> None:
    """Before any work: refuse (one line) a file output that is a directory (or written as one, ``dir/``), one that
    would replace what is being read (an input, or an existing file inside an input directory), and an existing
    file unless ``overwrite``."""
    if isinstance(out, str) and out.endswith(("/", os.sep)) or Path(out).is_dir():
        raise LMForgeError(f"{flag} {out}: is a directory; {flag} names a file")
    out = Path(out)
    target = out.resolve()
    for src in sources:
        if src is not None and src.exists() and (target == src.resolve() or (
                out.exists() and src.resolve() in target.parents)):
            raise LMForgeError(f"{flag} {out}: it would replace {'a file of ' if src.is_dir() else ''}{src}, which "
                               "is being read; write elsewhere")
    if out.exists() and not overwrite:
        raise LMForgeError(f"{flag} {out}: exists; pass --overwrite to replace it")


def cannot_write_in(path: Path, parent: Path, e: OSError) -> LMForgeError:
    """The one-line error for ``path`` when its directory ``parent`` cannot be made or written in: naming the file
    that stands where a directory should be, if one does (mkdir says only "File exists")."""
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                return LMForgeError(f"{path}: cannot write in {parent}: {p} is a file, not a directory")
            break
    return LMForgeError(f"{path}: cannot write in {parent}: {e.strerror}")


class AtomicFile:
    """A temporary file beside ``path``, renamed over it by ``commit()``; removed if never committed. The file gets
    the permissions of a file the user creates (0666 minus the umask), not ``mkstemp``'s 0600."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        parent = self.path.parent if str(self.path.parent) else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)  # (as data prepare and tokenizer train make their outputs)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=parent)
        except OSError as e:
            raise cannot_write_in(self.path, parent, e) from None
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        os.fchmod(self.f.fileno(), 0o666 & ~current_umask())
        self.f.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all (a temporary file beside it, renamed over it)."""
    out = AtomicFile(path)
    try:
        out.f.write(text)
        out.commit()
    except BaseException:
        out.discard()
        raise


def read_json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file; a line that is not a JSON object: one line
    naming the file and line."""
    out = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise LMForgeError(f"{path}:{n}: not JSON: {e}") from None
        if not isinstance(d, dict):
            raise LMForgeError(f"{path}:{n}: expected a JSON object")
        out.append((n, d))
    return out


def read_utf8(path: Path, what: str = "") -> str:
    """The text of ``path`` (UTF-8, a leading byte-order mark dropped); cannot read it or not UTF-8: one line naming
    the file (and the line of the first bad byte). ``what``: the kind of file, said in the errors."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LMForgeError(f"{path}: cannot read{' the ' + what if what else ''}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        kind = f"; a {what} is a text file" if what else ""
        raise LMForgeError(f"{path}:{line}: not UTF-8 text (byte {e.start}){kind}") from None


def check_replaceable(out: Path, flag: str = "--output") -> None:
    """Before any work: an existing directory ``out`` that an output will replace by renaming a new one into place
    must be renameable (a mount point or an immutable directory is not: that failed only at the end)."""
    if not out.is_dir():
        return
    if os.path.ismount(out):
        raise LMForgeError(f"{flag} {out}: is a mount point, which cannot be replaced; give a directory inside it "
                           f"({flag} {out / 'data'})")
    probe = out.with_name(f".{out.name}.probe-{os.getpid()}")
    try:
        os.rename(out, probe)
    except OSError as e:
        raise LMForgeError(f"{flag} {out}: cannot be replaced ({e.strerror}); give another {flag}") from None
    os.rename(probe, out)


LOCK_FILE = ".lock"
_held: dict[Path, list] = {}  # resolved directory -> [fd, count, directories this lock made (outermost first)]


class DirLock:
    """An exclusive lock on a run directory, held while the ``with`` block runs (re-entrant within a process).

    A second process writing into the same directory (a second ``--resume`` in the same ``--out``) would delete
    the first one's checkpoint being saved and interleave their files: it is refused with one line naming the
    process that holds the directory. ``flock`` is released by the kernel when the holder dies (even by kill -9),
    so a stale ``.lock`` file never blocks a later run. Where ``fcntl`` does not exist (Windows) nothing is locked.
    A directory the lock made is removed again when the run left nothing in it but the lock (a command refused
    after taking it leaves no empty ``--out`` behind)."""

    def __init__(self, directory: str | Path, flag: str = "--out") -> None:
        self.dir, self.flag = Path(directory), flag

    def __enter__(self) -> DirLock:
        key = self.dir.resolve()
        if key in _held:
            _held[key][1] += 1
            return self
        if self.dir.is_symlink() and not self.dir.exists():
            raise LMForgeError(f"{self.flag} {self.dir}: a symbolic link to {os.readlink(self.dir)}, which does not "
                               "exist")
        if self.dir.exists() and not self.dir.is_dir():
            raise LMForgeError(f"{self.flag} {self.dir}: exists and is not a directory; {self.flag} names a directory")
        made = [d for d in (self.dir, *self.dir.parents) if not d.exists() and not d.is_symlink()][::-1]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as e:
            raise LMForgeError(f"{self.flag} {self.dir}: cannot write there: {e.strerror or e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise LMForgeError(f"{self.flag} {self.dir}: in use by {who} (another lmforge run writing into it); "
                                   f"wait for it to end, or choose another {self.flag}") from None
            except OSError as e:  # a file system without locks (some network or FUSE ones): run unlocked
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = [fd, 1, made]
        return self

    def __exit__(self, *exc) -> None:
        key = self.dir.resolve()
        held = _held.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _held[key]
            made = held[2]
            if made and _only_lock(self.dir):  # nothing was written: remove what the lock made (still holding it)
                try:
                    (self.dir / LOCK_FILE).unlink()
                    for d in reversed(made):
                        d.rmdir()
                except OSError:
                    pass
            os.close(held[0])  # releases the flock (a kept file stays: deleting it would race a process locking it)


def _only_lock(directory: Path) -> bool:
    try:
        return [e.name for e in os.scandir(directory)] == [LOCK_FILE]
    except OSError:
        return False


def cache_path(name: str) -> Path:
    """A file of lmforge's cache directory (``$XDG_CACHE_HOME/lmforge``, else ``~/.cache/lmforge``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / name


def read_cache(name: str) -> dict[str, Any]:
    """The JSON object in cache file ``name`` ({} when absent or unreadable)."""
    try:
        d = json.loads(cache_path(name).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache(name: str, d: dict[str, Any]) -> None:
    """Replace cache file ``name`` atomically (best effort: a read-only cache directory is fine)."""
    path = cache_path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(d, f)
        os.replace(tmp, path)
    except OSError:
        pass
