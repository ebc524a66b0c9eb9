"""Incremental detokenising and stop strings, against a tiny checkpoint's byte-level BPE tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from meshllm.models.tokenizer import load_tokenizer
from meshllm.server.text import REPLACEMENT_CHARACTER, IncrementalDetokenizer, StopStrings


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Callable[..., Path]):
    return load_tokenizer(tiny_checkpoint(arch="qwen3", layers=4))


def stream_text(tokenizer, token_ids: list[int], prompt_ids: list[int] = ()) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detokenizer.add(token_id) for token_id in token_ids]
    pieces.append(detokenizer.flush())
    return pieces


def test_multibyte_characters_are_never_split(tokenizer) -> None:
    text = "héllo wörld 世界 🙂 naïve — ok"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(token_ids) > len(text.encode()) // 2  # the tiny vocabulary splits these into byte tokens
    pieces = stream_text(tokenizer, token_ids)
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHARACTER in piece for piece in pieces)
    assert "" in pieces  # some tokens completed no character on their own


def test_streamed_text_equals_whole_decode_after_a_prompt(tokenizer) -> None:
    prompt_ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    reply = " jumps over the lazy dog. Numbers like 42 and 2048; façade."
    token_ids = tokenizer.encode(reply, add_special_tokens=False)
    assert "".join(stream_text(tokenizer, token_ids, prompt_ids)) == reply


def test_special_tokens_are_left_out(tokenizer) -> None:
    token_ids = tokenizer.encode("Hello", add_special_tokens=False) + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    ]
    assert "".join(stream_text(tokenizer, token_ids)) == "Hello"


def test_bytes_that_are_not_utf8_come_out_after_a_few_tokens(tokenizer) -> None:
    e_acute = tokenizer.encode("é", add_special_tokens=False)
    assert len(e_acute) == 2  # bytes C3 A9, one token each
    byte_tokens = [e_acute[1]] * 20  # lone continuation bytes: no character at all
    pieces = stream_text(tokenizer, byte_tokens)
    assert any(pieces[:-1]), "noise is streamed before the end, not held back for ever"
    assert "".join(pieces) == tokenizer.decode(byte_tokens)


def feed_all(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    stop_strings = StopStrings(stops)
    emitted = []
    for piece in pieces:
        text, found = stop_strings.feed(piece)
        emitted.append(text)
        if found:
            return emitted, True
    emitted.append(stop_strings.flush())
    return emitted, False


def test_stop_string_inside_one_piece_cuts_before_it() -> None:
    emitted, found = feed_all(["STOP"], ["Hello STOP world"])
    assert found and "".join(emitted) == "Hello "


def test_stop_string_across_pieces_is_held_back_and_never_emitted() -> None:
    emitted, found = feed_all(["</end>"], ["abc<", "/en", "d>more"])
    assert found
    assert emitted == ["abc", "", ""]


def test_partial_stop_string_is_released_when_it_does_not_complete() -> None:
    emitted, found = feed_all(["</end>"], ["abc</e", "x and more"])
    assert not found
    assert emitted == ["abc", "</ex and more", ""]


def test_earliest_of_several_stop_strings_wins() -> None:
    emitted, found = feed_all(["world", "lo w"], ["hello world"])
    assert found and "".join(emitted) == "hel"


def test_held_text_is_flushed_at_the_end() -> None:
    emitted, found = feed_all(["xyz"], ["ab", "cx"])
    assert not found
    assert emitted == ["ab", "c", "x"]


def test_no_check_passes_everything_through() -> None:
    stop_strings = StopStrings(["ab"])
    assert stop_strings.feed("xxab", check=False) == ("xxab", False)


def test_stop_strings_name_the_one_that_occurs_first() -> None:
    stops = StopStrings(["cd", "b", "xyz"])
    assert stops.matched is None
    assert stops.feed("a") == ("a", False) and stops.matched is None
    assert stops.feed("bcd") == ("", True)
    assert stops.matched == "b"  # "cd" is in the text too, but later
    tie = StopStrings(["bc", "b"])
    assert tie.feed("abc") == ("a", True) and tie.matched == "bc"  # at the same place: the first listed
