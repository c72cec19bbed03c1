"""The interface every lmforge tokenizer implements."""

from __future__ import annotations


class Tokenizer:
    """Text <-> token ids. Subclasses set the attributes and implement encode/decode."""

    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True  # text is encoded after BOS (False: a GGUF's tokenizer.ggml.add_bos_token = false)
    end_ids: tuple[int, ...] = ()  # the model's other end ids (Llama 3's list), set where a model is loaded with it

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def prompt_prefix(self) -> list[int]:
        """What a plain-text prompt starts with: BOS where the tokenizer has one and adds it."""
        return [self.bos_id] if self.bos_id is not None and self.add_bos else []

    def stop_ids(self) -> list[int]:
        """Ids that end a generation of plain text: EOS, BOS (a document boundary, as in llama2.c) and the model's
        other end ids."""
        return list(dict.fromkeys(i for i in (self.eos_id, self.bos_id, *self.end_ids) if i is not None))

    def _add_special(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """``ids`` with BOS in front and/or EOS at the end, when asked for and the tokenizer has them."""
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes of ``ids`` (for streaming: a partial UTF-8 character is not lost)."""
        return self.decode(ids).encode("utf-8")

    def save(self, directory: str) -> None:
        """Write the tokenizer files into a checkpoint directory."""
        raise NotImplementedError
