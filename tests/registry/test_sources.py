"""Parsing backends files: a file caught mid-write is never taken for a complete one."""

from __future__ import annotations

import pytest

from poise.registry.sources import SourceError, parse_backend_file


@pytest.mark.parametrize("text", ["", "   \n\t\n", "\n"])
def test_an_empty_or_blank_file_is_refused(text: str) -> None:
    with pytest.raises(SourceError, match=r"empty file \(write \[\] to mean no backends\)"):
        parse_backend_file(text, "b.txt")


def test_an_explicit_empty_json_list_means_no_backends() -> None:
    assert parse_backend_file("[]\n", "b.json") == ()
    assert parse_backend_file(" [ ] ", "b.json") == ()


def test_plain_text_without_a_final_newline_is_incomplete() -> None:
    with pytest.raises(SourceError, match="does not end with a newline"):
        parse_backend_file("http://127.0.0.1:2001\nhttp://127.0.0.1:200", "b.txt")
    whole = parse_backend_file("http://127.0.0.1:2001\nhttp://127.0.0.1:2002\n", "b.txt")
    assert [b.port for b in whole] == [2001, 2002]


def test_plain_text_with_only_comments_is_refused() -> None:
    with pytest.raises(SourceError, match="no backends, only comments"):
        parse_backend_file("# nothing yet\n", "b.txt")


def test_every_prefix_of_a_json_file_but_the_whole_is_refused() -> None:
    text = '[{"url": "http://127.0.0.1:2001", "weight": 2}, "http://127.0.0.1:2002"]'
    for n in range(len(text)):
        with pytest.raises(SourceError):
            parse_backend_file(text[:n], "b.json")
    assert len(parse_backend_file(text, "b.json")) == 2
