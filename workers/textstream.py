"""Incremental detokenisation: emit text as tokens arrive, never half a multi-byte character."""

from __future__ import annotations

from itertools import islice

# Prompt tokens a stream starts from as context (vLLM's incremental detokenizer takes 5): a
# token's text may depend on the tokens before it, and SentencePiece decoders (Llama-2, Mistral)
# drop the leading space of a text's first token, so the output decoded alone loses the space
# before its first word ("Paris." for " Paris.") and a stop string starting with a space could
# not match there.
CONTEXT_TOKENS = 5


class TextStream:
    """Returns only the new, complete text as tokens arrive: what the prompt and the tokens so
    far decode to past what the prompt decodes to.

    Each push decodes a window, not the whole output (that cost time quadratic in the output's
    length on the replica's event loop: 7 s over 8,000 tokens): the tokens since the last
    emitted text, after the tokens of the emission before it as context (before the first
    emission, the prompt's last ``CONTEXT_TOKENS``; their text is never emitted). The new text
    is what the window decodes to past what its context decodes to."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, prompt: list[int] = ()):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        context: list[int] = []
        if prompt:
            # Special tokens skipped in decoding give no context: a chat prompt may end with
            # several of them.
            skipped = set(tokenizer.all_special_ids) if self.skip else set()
            context = list(islice((t for t in reversed(prompt) if t not in skipped),
                                  CONTEXT_TOKENS))[::-1]
        self.tokens: list[int] = context  # the context, then the output's tokens
        self.start = len(context)  # where the output's tokens start
        self.context_chars = len(self._decode(context))
        self.prefix_offset = 0  # where the window's context starts
        self.read_offset = self.start  # where the tokens not yet emitted start

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
        """The output's text: all the pushes emit once flushed."""
        return self._decode(self.tokens)[self.context_chars:]

    def tokens_through(self, chars: int) -> int:
        """How many of the output's tokens so far it takes for its text to reach ``chars``
        characters (all of them if it never does)."""
        lo, hi = 0, len(self.tokens) - self.start
        while lo < hi:  # the fewest tokens whose text is at least ``chars`` long
            mid = (lo + hi) // 2
            text = self._decode(self.tokens[:self.start + mid])
            if len(text.rstrip("\ufffd")) - self.context_chars >= chars:
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
