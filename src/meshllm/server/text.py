"""From token ids to the text a client sees: incremental detokenising and stop strings.

Both work piece by piece, so streamed and non-streamed replies go through exactly the same code and are
equal by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshllm.runtime.engine_client import Tokenizer

REPLACEMENT_CHARACTER = "\ufffd"  # what a decoder writes for the bytes of an incomplete character
PROMPT_CONTEXT_TOKENS = 6  # prompt tokens decoded along with the first new ones (leading-space rules)
# A character is at most 4 bytes: text still ending in U+FFFD after this many tokens is no character in
# the making but bytes that are not UTF-8 (a random-weight model emits them): let it out.
MAX_HELD_TOKENS = 8


class IncrementalDetokenizer:
    """Turns one token id at a time into new text, never splitting a multi-byte character.

    Each call decodes a short window (the tokens since the last emitted text plus the few before them) and
    returns what that window adds; while the window ends in U+FFFD, the character is incomplete and the
    text waits for the next token (for at most MAX_HELD_TOKENS tokens). Starting from the prompt's last tokens keeps tokenizers that drop a
    leading space at the start of a text (SentencePiece) from dropping it from the reply.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = len(self._ids)  # tokens before this are already in the emitted text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _pending_text(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        return window_text[len(prefix_text) :] if len(window_text) > len(prefix_text) else ""

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes; empty while a character is still incomplete."""
        self._ids.append(token_id)
        text = self._pending_text()
        held_tokens = len(self._ids) - self._read_offset
        if not text or (text.endswith(REPLACEMENT_CHARACTER) and held_tokens < MAX_HELD_TOKENS):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text

    def flush(self) -> str:
        """At the end of the reply: whatever is still held back, an incomplete character included."""
        text = self._pending_text()
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text


class StopStrings:
    """Cuts the reply before the first stop string, and never lets a stop string (or part of it) out.

    Text that could be the start of a stop string is held back until the next piece shows whether it is;
    a stop string can therefore never straddle text that was already emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the reply (the first to occur)

    def feed(self, text: str, check: bool = True) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found). With check=False, passes through."""
        self._held += text
        if not self._stops or not check:
            return self.flush(), False
        found = [
            (index, order) for order, stop in enumerate(self._stops) if (index := self._held.find(stop)) >= 0
        ]
        if found:
            index, order = min(found)
            emitted, self.matched = self._held[:index], self._stops[order]
            self._held = ""
            return emitted, True
        keep = self._partial_stop_suffix()
        emitted = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return emitted, False

    def flush(self) -> str:
        """At the end of the reply (no stop string found): the held-back text is ordinary text after all."""
        emitted, self._held = self._held, ""
        return emitted

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the held text that is the beginning of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:length]):
                    longest = length
                    break
        return longest
