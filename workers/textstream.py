"""Incremental detokenisation: emit text as tokens arrive, never half a multi-byte character."""

from __future__ import annotations


class TextStream:
    """Returns only the new, complete text as tokens arrive.

    Each push decodes a window, not the whole output (that cost time quadratic in the output's
    length on the replica's event loop: 7 s over 8,000 tokens): the tokens since the last
    emitted text, after the tokens of the emission before it as context (a tokenizer may
    decode a token differently at the start of a text: SentencePiece drops a leading space).
    The new text is what the window decodes to past what its context decodes to."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0  # where the window's context starts
        self.read_offset = 0  # where the tokens not yet emitted start

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip)

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        context = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        window = self._decode(self.tokens[self.prefix_offset:])
        # An incomplete UTF-8 sequence at the end waits for the next token (unless final).
        if len(window) <= len(context) or (window.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return window[len(context):]

    @property
    def text(self) -> str:
        return self._decode(self.tokens)

    def tokens_through(self, chars: int) -> int:
        """How many of the tokens so far it takes for the decoded text to reach ``chars``
        characters (all of them if it never does)."""
        lo, hi = 0, len(self.tokens)
        while lo < hi:  # the fewest tokens whose text is at least ``chars`` long
            mid = (lo + hi) // 2
            text = self.tokenizer.decode(self.tokens[:mid], skip_special_tokens=self.skip)
            if len(text.rstrip("\ufffd")) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo


class StopStrings:
    """Holds back text that may be the start of a stop string; cuts the text at the first stop
    to complete."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.fed = 0  # characters pushed so far
        self.stop_end: int | None = None  # where in the pushed text the first stop string ends

    def push(self, text: str) -> str:
        """Feed new text; return what is safe to emit now."""
        if self.stopped:
            return ""
        self.pending += text
        self.fed += len(text)
        found = [(i, len(s)) for i, s in ((self.pending.find(s), s) for s in self.stops)
                 if i >= 0]
        if found:
            # The stop completed first (the earliest end; of those, the longest): what a
            # token-by-token stream meets first, so a step committing several tokens at once
            # cuts the text where one committing them one at a time would.
            cut, length = min(found, key=lambda f: (f[0] + f[1], f[0]))
            self.stop_end = self.fed - len(self.pending) + cut + length
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
