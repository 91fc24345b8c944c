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


def test_earliest_stop_wins_and_of_equal_starts_the_shortest():
    stops = StopStrings(["cd", "bcd", "bc"])
    assert stops.push("abcde") == "a"
    assert stops.stop_end == len("abc")  # "bc" and "bcd" start at 1; "bc" ends first


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
