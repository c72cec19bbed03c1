"""Incremental detokenization with stop strings (``TextStream``), without torch: a process decoding with a
model that does not need torch (native int4) can stream text without importing it."""

from __future__ import annotations

import codecs


class TextStream:
    """Incremental detokenization with stop strings.

    Text is decoded from a sliding window of ids (differences of two decodes, so tokenizers that drop a leading
    space at the start of a decode stay right), held back while a UTF-8 character is incomplete, and held back
    while its end could be the start of a stop string.
    """

    MAX_HELD = 8  # tokens an incomplete character may hold before it is shown as U+FFFD

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None) -> None:
        self.tok = tokenizer
        self._after = getattr(tokenizer, "bytes_after", None)  # a token's bytes after another, where they are known
        self.ids = list(prompt_ids[-4:])
        self.prefix, self.read = 0, len(self.ids)
        self.stop = [s for s in (stop or []) if s]
        self.pending = ""  # decoded text not yet shown (might begin a stop string)
        # the pieces of the text shown, joined by ``text`` (a string appended to per token was copied whole each
        # time: quadratic in the length)
        self._shown: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """All text shown."""
        if len(self._shown) > 1:
            self._shown = ["".join(self._shown)]
        return self._shown[0] if self._shown else ""

    def push(self, token: int) -> str:
        """Add a token; return the newly shown text. Sets ``stopped`` when a stop string appears."""
        self.ids.append(token)
        new = self._decode_new(final=False)
        return self._show(new) if new else ""

    def flush(self) -> str:
        """At the end of generation: show what is still held."""
        if self.stopped:
            return ""
        new = self._decode_new(final=True)
        out = self._show(new) if new else ""
        if not self.stopped:
            out += self.pending
            self._shown.append(self.pending)
            self.pending = ""
        return out

    def _decode_new(self, final: bool) -> str:
        ids = self.ids
        if self._after is not None and self.read == len(ids) - 1 and self.read:  # one new token after shown ones
            raw = self._after(ids[-2], ids[-1])  # (the two decodes below, without them: 1-2 us a token less)
            if raw is not None:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                if text is not None and not text.endswith("\ufffd"):
                    self._consumed()
                    return text
        dec = self.tok.decode_bytes
        before = dec(self.ids[self.prefix : self.read])
        after = dec(self.ids[self.prefix :])
        if not after.startswith(before):  # the tokenizer rewrote earlier text: take the common part as shown
            k = 0
            while k < min(len(before), len(after)) and before[k] == after[k]:
                k += 1
            before = after[:k]
        raw = after[len(before) :]
        held = len(self.ids) - self.read
        try:
            text = raw.decode("utf-8")
            incomplete = text.endswith("\ufffd") and not final and held < self.MAX_HELD
        except UnicodeDecodeError:
            if not final and held < self.MAX_HELD:
                dec8 = codecs.getincrementaldecoder("utf-8")()
                try:  # a partial character at the end: wait for the next token
                    dec8.decode(raw, final=False)
                    return ""
                except UnicodeDecodeError:
                    pass
            text, incomplete = raw.decode("utf-8", errors="replace"), False
        if incomplete:
            return ""
        self._consumed()
        return text

    def _consumed(self) -> None:
        """The new tokens are shown: the next decode's window starts at them."""
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 64:  # keep the window short
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0

    def _show(self, new: str) -> str:
        buf = self.pending + new
        if self.stop:
            hits = [(buf.find(s), s) for s in self.stop if s in buf]
            if hits:
                cut = min(h for h, _ in hits)
                out = buf[:cut]
                self._shown.append(out)
                self.pending = ""
                self.stopped = True
                return out
            keep = 0  # longest suffix of buf that is a proper prefix of a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(buf)), keep, -1):
                    if buf.endswith(s[:k]):
                        keep = k
                        break
            out, self.pending = (buf[:-keep], buf[-keep:]) if keep else (buf, "")
        else:
            out, self.pending = buf, ""
        self._shown.append(out)
        return out
