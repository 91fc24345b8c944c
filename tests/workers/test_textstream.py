"""Incremental detokenisation and stop strings, on hand-made text."""

from __future__ import annotations

from workers.textstream import StopStrings, TextStream


class PieceTokenizer:
    """Token i decodes to PIECES[i]; enough for the bookkeeping under test."""

    PIECES = ["ab", "c", "def", "\ufffd", "g"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def test_stop_string_split_across_pushes_is_held_back_then_cut():
    stops = StopStrings(["END"])
    assert stops.push("abc E") == "abc "
    assert stops.push("N") == ""
    assert not stops.stopped
    assert stops.push("D and more") == ""
    assert stops.stopped and stops.stop_end == len("abc END")
    assert stops.push("later") == "" and stops.flush() == ""


def test_the_stop_completed_first_wins():
    stops = StopStrings(["cd", "bcd", "bc"])
    assert stops.push("abcde") == "a"
    assert stops.stop_end == len("abc")  # "bc" and "bcd" start at 1; "bc" ends first
    # "abcd" starts first but "bc" completes first: one character at a time meets "bc".
    for chunks in (["abcde"], list("abcde"), ["ab", "cde"], ["a", "bcd", "e"]):
        stops = StopStrings(["abcd", "bc"])
        out = "".join(stops.push(c) for c in chunks) + stops.flush()
        assert (out, stops.stop_end) == ("a", 3), chunks
    stops = StopStrings(["xbc", "bc"])  # both end at 3: the longer one, starting earlier
    assert stops.push("xbcd") == "" and stops.stop_end == 3


def test_a_false_start_is_released():
    stops = StopStrings(["END"])
    assert stops.push("E") == ""
    assert stops.push("x") == "Ex"
    assert stops.push("EN") == ""
    assert stops.flush() == "EN" and not stops.stopped and stops.stop_end is None


def test_text_stream_emits_new_text_and_counts_tokens_through_an_offset():
    text = TextStream(PieceTokenizer())
    assert text.push([0, 1]) == "abc"
    assert text.push([3]) == ""  # an incomplete character waits
    assert text.push([2]) == "\ufffddef"
    assert [text.tokens_through(n) for n in (0, 1, 2, 3, 4, 7, 99)] == [0, 1, 1, 2, 4, 4, 4]


def test_each_push_decodes_a_window_not_the_whole_output():
    """Decoding the whole output at every step cost time quadratic in its length."""

    class Counting(PieceTokenizer):
        longest = 0

        def decode(self, ids, skip_special_tokens=True):
            Counting.longest = max(Counting.longest, len(ids))
            return super().decode(ids, skip_special_tokens)

    text = TextStream(Counting())
    out = "".join(text.push([i % 3 for i in range(k, k + 2)]) for k in range(0, 2000, 2))
    out += text.flush()
    assert Counting.longest <= 4
    assert out == text.text and len(out) > 1000


def test_the_bundled_tokenizer_streams_exactly_its_full_decoding(bundled):
    """Pushed in any chunks, the emitted texts join to the whole output's decoding: multi-byte
    characters split across tokens, spaces, newlines and special tokens included."""
    import random

    tok = bundled.loaded.tokenizer
    sample = ("def f(x):\n    return x ** 2  # square\n\nNaïve café — “quotes” 東京 🙂🚀 "
              "ümlaut\tand tabs.  Double  spaces, then <|im_end|> a special token.")
    ids = tok(sample)["input_ids"]
    rng = random.Random(0)
    sequences = [ids, [rng.randrange(len(tok)) for _ in range(300)]]
    for seq in sequences:
        for _ in range(20):
            text, out, i = TextStream(tok), [], 0
            while i < len(seq):
                n = rng.randint(1, 4)
                out.append(text.push(seq[i:i + n]))
                i += n
            out.append(text.flush())
            assert "".join(out) == tok.decode(seq, skip_special_tokens=True)
