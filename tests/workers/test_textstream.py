"""Incremental detokenisation and stop strings, on hand-made text."""

from __future__ import annotations

import itertools

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


def streamed(text: TextStream, tokens: list[int], rng, most: int) -> list[str]:
    """What ``text`` emits for ``tokens`` pushed in random chunks of 1 to ``most``, flushed."""
    out, i = [], 0
    while i < len(tokens):
        n = rng.randint(1, most)
        out.append(text.push(tokens[i:i + n]))
        i += n
    return [*out, text.flush()]


def sentencepiece_tokenizer():
    """A Llama-2/Mistral-style decoder (their tokenizer.json's: "▁" to a space, byte fallback,
    fuse, strip one leading space) over a toy vocabulary, built here: no download."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris",
              ".", "▁caf", "<0xC3>", "<0xA9>", "<0x0A>", "▁", "s"]
    model = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    # Words, so that a prompt never ends inside a character: "é" is two byte tokens.
    words = [[3], [4], [5], [6], [7], [8], [9], [10, 11, 12], [14, 11, 12], [13], [15], [2]]
    return tok, words


def test_a_sentencepiece_stream_keeps_the_space_before_its_first_word():
    """Decoded alone, the output's first token lost its leading space ("Paris." for
    " Paris."): the stream starts from the prompt's last tokens, whose text it does not emit."""
    import random

    tok, words = sentencepiece_tokenizer()
    prompt, output = [1, 3, 4, 5, 6, 7], [8, 9, 2]  # "The capital of France is" " Paris."
    text = TextStream(tok, prompt=prompt)
    assert "".join(text.push([t]) for t in output) + text.flush() == " Paris."
    assert text.text == " Paris."
    stops = StopStrings([" Paris"])
    text = TextStream(tok, prompt=prompt)
    assert stops.push(text.push(output)) == "" and stops.stop_end == len(" Paris")
    assert text.tokens_through(stops.stop_end) == 1  # output tokens: the prompt's not counted
    assert [text.tokens_through(n) for n in (0, 1, 6, 7, 99)] == [0, 1, 1, 2, 3]

    rng = random.Random(0)
    for _ in range(300):
        # Chat templates end with special tokens: they decode to nothing and give no context.
        prompt = [1] + [t for _ in range(rng.randint(0, 8)) for t in rng.choice(words)]
        prompt += [rng.choice([1, 2]) for _ in range(rng.randint(0, 6))]
        output = [t for _ in range(rng.randint(1, 8)) for t in rng.choice(words)]
        text = TextStream(tok, prompt=prompt)
        out = streamed(text, output, rng, 3)
        expected = tok.decode(prompt + output, skip_special_tokens=True)
        expected = expected[len(tok.decode(prompt, skip_special_tokens=True)):]
        assert "".join(out) == text.text == expected, (prompt, output)


def test_the_bundled_tokenizer_streams_exactly_its_full_decoding(bundled):
    """Pushed in any chunks, the emitted texts join to the whole output's decoding: multi-byte
    characters split across tokens, spaces, newlines and special tokens included. A byte-level
    BPE decodes a token the same after any context: a chat prompt's changes nothing."""
    import random

    tok = bundled.loaded.tokenizer
    sample = ("def f(x):\n    return x ** 2  # square\n\nNaïve café — “quotes” 東京 🙂🚀 "
              "ümlaut\tand tabs.  Double  spaces, then <|im_end|> a special token.")
    ids = tok(sample)["input_ids"]
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                   add_generation_prompt=True, tokenize=False)
    rng = random.Random(0)
    sequences = [ids, [rng.randrange(len(tok)) for _ in range(300)]]
    for seq, prompt in itertools.product(sequences, ((), tok(chat)["input_ids"])):
        for _ in range(20):
            out = streamed(TextStream(tok, prompt=prompt), seq, rng, 4)
            assert "".join(out) == tok.decode(seq, skip_special_tokens=True)
