"""Incremental detokenisation: emit text as tokens arrive, never half a multi-byte character."""

from __future__ import annotations


class TextStream:
    """Decodes the growing token list and returns only the new, complete text each time."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.tokens: list[int] = []
        self.emitted = 0  # characters already returned

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)

    def push(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        new = text[self.emitted:]
        self.emitted = len(text)
        return new

    def flush(self) -> str:
        text = self._text()
        new = text[self.emitted:]
        self.emitted = len(text)
        return new

    @property
    def text(self) -> str:
        return self._text()

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
