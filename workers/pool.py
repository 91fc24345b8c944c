"""A replica's pool of earlier outputs, for n-gram drafting across requests.

Prompt lookup finds drafts only in the request's own text. Much of what a model writes it has
written before for other requests (an answer's opening, a code idiom, a closing sentence), so the
n-gram drafters (``ngram_tree``, hybrid arms with ``pool``) also look up the context's last n-gram
in this pool: the base model's own continuations of offline requests (built by ``s3d pool``,
shipped for the bundled model), then every finished request's output, newest first. Drafts are
only drafts: verification keeps the output exactly the base model's.

The index is a hash chain per n-gram length, as LZ77 compressors keep one: ``head[n][key]`` is
the newest position after an occurrence of that n-gram, ``prev[n][pos]`` the one before it. A
lookup walks at most ``chain`` links per length, so its cost does not grow with the pool. When the
pool holds more than ``capacity`` tokens, the older half of its sequences is dropped.
"""

from __future__ import annotations

import json
import logging
from array import array
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from workers.files import replacing, write_text

log = logging.getLogger(__name__)

BUNDLED_POOL = Path(__file__).parent / "data" / "pool-smollm2-135m-instruct.safetensors"
SEPARATOR = -1  # between sequences: no n-gram of a context contains it
KEY_BITS = 24  # an n-gram packs into one int exactly for vocabularies below 2**24


def add_branch(found: list[list[int]], seen: set[tuple[int, ...]], cont: list[int],
               max_branches: int) -> bool:
    """Append ``cont`` to ``found`` unless it is empty or seen before; True once ``found``
    holds ``max_branches``."""
    key = tuple(cont)
    if cont and key not in seen:
        seen.add(key)
        found.append(cont)
    return len(found) >= max_branches


def _split(flat):
    """The sequences of ``flat`` (back to back, each ended by ``SEPARATOR``)."""
    seq: list[int] = []
    for token in flat:
        if token == SEPARATOR:
            yield seq
            seq = []
        else:
            seq.append(token)


class PoolMismatchError(ValueError):
    """The pool file was made with another model (another tokenizer)."""


class TokenPool:
    def __init__(self, capacity: int = 1 << 18, ngram_min: int = 2, ngram_max: int = 4,
                 chain: int = 16, live: bool = True):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        self.capacity, self.ngram_min, self.ngram_max = capacity, ngram_min, ngram_max
        self.chain = chain
        self.live = live  # whether finished requests join the pool
        # Tokens held (separators not counted), set once an addition or a drop is complete:
        # ``len`` reads this one attribute, as a replica's gauge reads it on another thread while
        # the decoding thread changes the pool (taken from the tokens and the count of
        # sequences, it read negative while ``_clear`` had reset one and not yet the other).
        self._held = 0
        self._clear()

    def _clear(self) -> None:
        self.tokens = array("i")
        self.sequences = 0
        self._starts = array("q")  # where each sequence starts
        self.head: dict[int, dict[int, int]] = {n: {} for n in self._lengths()}
        self.prev: dict[int, array] = {n: array("q") for n in self._lengths()}

    def _lengths(self) -> range:
        return range(self.ngram_min, self.ngram_max + 1)

    def __len__(self) -> int:
        """Tokens held (separators not counted)."""
        return self._held

    @staticmethod
    def _key(ngram) -> int:
        key = 0
        for token in ngram:
            key = (key << KEY_BITS) | token
        return key

    def add(self, sequence: list[int]) -> None:
        """Append one sequence (a request's output) and index its n-grams; one that is too short
        to hold a continuation, or longer than the whole pool may hold, is not kept."""
        if not self.ngram_min < len(sequence) <= self.capacity:
            return
        while len(self) + len(sequence) > self.capacity:  # the newer half may be the longer
            self._drop_older_half()
        self._index(sequence)
        self._held += len(sequence)

    def _index(self, sequence: list[int]) -> None:
        """Append ``sequence`` and index its n-grams (``_held`` is the caller's)."""
        start = len(self.tokens)
        self._starts.append(start)
        self.tokens.extend(sequence)
        self.tokens.append(SEPARATOR)
        self.sequences += 1
        for n in self._lengths():
            head, prev = self.head[n], self.prev[n]
            prev.extend([-1] * (len(self.tokens) - len(prev)))
            for end in range(start + n, start + len(sequence)):  # a continuation follows
                key = self._key(sequence[end - n - start:end - start])
                prev[end] = head.get(key, -1)
                head[key] = end

    def add_all(self, flat) -> None:
        """Add every sequence of ``flat`` (sequences back to back, each ended by ``SEPARATOR``,
        as ``tokens`` holds them)."""
        for seq in _split(flat):
            self.add(seq)

    def _drop_older_half(self) -> None:
        keep = self._starts[len(self._starts) // 2] if len(self._starts) > 1 else len(self.tokens)
        rest = self.tokens[keep:]
        self._clear()
        for seq in _split(rest):  # each was kept once: it fits
            self._index(seq)
        self._held = len(self.tokens) - self.sequences

    def continuations(self, tokens: list[int], depth: int, max_branches: int,
                      ngram_min: int = 1, exclude: set[tuple[int, ...]] | None = None
                      ) -> list[list[int]]:
        """Up to ``max_branches`` distinct continuations (``depth`` tokens at most) of the
        context's last n-gram in the pool: the longest n first, newest occurrence first.
        Continuations in ``exclude`` are skipped."""
        seen = set(exclude or ())
        found: list[list[int]] = []
        for n in range(min(self.ngram_max, len(tokens)), max(self.ngram_min, ngram_min) - 1, -1):
            pos = self.head[n].get(self._key(tokens[-n:]), -1)
            prev, pool = self.prev[n], self.tokens
            for _ in range(self.chain):
                if pos < 0:
                    break
                cont = []
                for token in pool[pos:pos + depth]:
                    if token == SEPARATOR:
                        break
                    cont.append(token)
                if add_branch(found, seen, cont, max_branches):
                    return found
                pos = prev[pos]
            if found:  # a shorter n-gram's matches are worse than a longer one's
                return found
        return found

    def copy(self, live: bool | None = None) -> TokenPool:
        """An independent pool with the same contents (``live`` as given, else as this one)."""
        other = TokenPool(self.capacity, self.ngram_min, self.ngram_max, self.chain,
                          self.live if live is None else live)
        other.tokens, other._starts = array("i", self.tokens), array("q", self._starts)
        other.sequences, other._held = self.sequences, self._held
        other.head = {n: dict(h) for n, h in self.head.items()}
        other.prev = {n: array("q", p) for n, p in self.prev.items()}
        return other

    # --- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path, metadata: dict) -> None:
        """The pool's sequences (back to back, ``-1`` between) as safetensors; ``metadata``
        (the model's fingerprint, how it was made) in the file and in a JSON file beside it."""
        path = Path(path)
        with replacing(path) as tmp:  # whole or not at all, as the JSON
            save_file({"tokens": torch.tensor(self.tokens.tolist(), dtype=torch.int32)},
                      str(tmp), metadata={"s3d_pool": json.dumps(metadata)})
        write_text(path.with_suffix(".json"), json.dumps(metadata, indent=2) + "\n")

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("s3d_pool", "{}"))

    @classmethod
    def load(cls, path: str | Path, fingerprint: str, **kwargs) -> TokenPool:
        meta = cls.read_metadata(path)
        if meta.get("fingerprint") != fingerprint:
            raise PoolMismatchError(
                f"pool {path} was made for model {meta.get('fingerprint')!r}, not {fingerprint!r}")
        pool = cls(**kwargs)
        pool.add_all(load_file(str(path))["tokens"].tolist())
        return pool


def resolve_pool(path: str | None, fingerprint: str, capacity: int = 1 << 18,
                 record: bool = True, used: bool = True) -> TokenPool:
    """The given pool file (``"none"``: an empty pool), else the bundled one when it was made
    for this model, else an empty pool; finished requests join it when ``record``. Unless
    ``used`` (an arm of the profile drafts from it) there is nothing to load or to record: an
    empty pool that takes no answers; a file given is loaded (and checked) all the same (the
    search starts from a profile without such arms, and tries them with it)."""
    if path not in (None, "none"):
        return TokenPool.load(path, fingerprint, capacity=capacity, live=record and used)
    if not used:
        return TokenPool(capacity, live=False)
    if path is None:
        if not BUNDLED_POOL.exists():
            return TokenPool(capacity, live=record)
        try:
            return TokenPool.load(BUNDLED_POOL, fingerprint, capacity=capacity, live=record)
        except PoolMismatchError:
            log.info("bundled pool is for another model; starting with an empty pool")
            return TokenPool(capacity, live=record)
    return TokenPool(capacity, live=record)  # "none"


def build_pool(engine, counts: dict[str, int], new_tokens: int = 64,
               log=print) -> tuple[TokenPool, dict]:
    """A pool of the base model's greedy answers to offline requests (``counts`` per kind of
    ``workers.corpus.ROLLOUT_KINDS``; the benchmark's and the search's sources are held back),
    and its metadata."""
    from workers.corpus import rollout_prompts, rollouts

    pool = TokenPool(capacity=1 << 30)
    made = {}
    for kind, count in counts.items():
        if count <= 0:
            continue
        prompts = rollout_prompts(engine.tokenizer, kind, count)
        answers = [s.tokens[len(p):] for p, s in
                   zip(prompts, rollouts(engine, prompts, new_tokens, desc=f"{kind} answers"))]
        for answer in answers:
            pool.add(answer)
        made[kind] = {"requests": len(prompts), "tokens": sum(map(len, answers))}
        log(f"{kind}: {len(prompts)} requests, {made[kind]['tokens']} tokens")
    return pool, {"fingerprint": engine.loaded.fingerprint, "kinds": made,
                  "new_tokens": new_tokens, "tokens": len(pool), "sequences": pool.sequences}
