"""Chunking by the embedding model's own tokens."""

from __future__ import annotations

import pytest

from knowledge.chunking import SPECIAL_TOKENS, chunk_text, contextual_header
from knowledge.embeddings import _wordpiece_tokenizer
from knowledge.extraction import extract
from knowledge.extraction.base import TextBuilder

TOKENIZER = _wordpiece_tokenizer()


def _sentences(n: int, prefix: str = "Sentence") -> str:
    return " ".join(f"{prefix} number {i} talks about expense reports and travel approvals." for i in range(n))


def _input_tokens(text: str) -> int:
    return len(TOKENIZER(text, add_special_tokens=False)["input_ids"]) + SPECIAL_TOKENS


@pytest.mark.parametrize(("size", "overlap"), [(64, 8), (200, 32), (256, 0)])
def test_no_chunk_ever_exceeds_the_models_input(size: int, overlap: int) -> None:
    builder = TextBuilder()
    builder.heading(1, "A very long heading " * 10)
    builder.paragraph(_sentences(200))
    extracted = builder.build()
    chunks = chunk_text(extracted, title="Employee handbook with a long title " * 3, tokenizer=TOKENIZER,
                        chunk_tokens=size, overlap_tokens=overlap, max_tokens=256)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.token_count <= size
        assert _input_tokens(chunk.embed_text) <= 256


def test_chunks_cover_the_text_and_overlap() -> None:
    builder = TextBuilder()
    builder.paragraph(_sentences(60))
    extracted = builder.build()
    chunks = chunk_text(extracted, title="", tokenizer=TOKENIZER, chunk_tokens=64, overlap_tokens=16,
                        max_tokens=256)
    assert chunks[0].char_start == 0
    assert chunks[-1].char_end == len(extracted.text)
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after.char_start < before.char_end, "consecutive chunks overlap"
        assert after.char_start > before.char_start
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))


def test_chunk_ends_snap_to_sentence_boundaries() -> None:
    builder = TextBuilder()
    builder.paragraph(_sentences(40))
    chunks = chunk_text(builder.build(), title="", tokenizer=TOKENIZER, chunk_tokens=80, overlap_tokens=0,
                        max_tokens=256)
    assert all(c.text.rstrip().endswith(".") for c in chunks)


def test_chunks_carry_headings_and_pages() -> None:
    builder = TextBuilder()
    builder.page_break()
    builder.heading(1, "Leave")
    builder.paragraph("Twenty days of paid leave a year.")
    builder.page_break()
    builder.heading(2, "Sick leave")
    builder.paragraph("Tell your manager on the first day.")
    extracted = builder.build()
    chunks = chunk_text(extracted, title="Handbook", tokenizer=TOKENIZER, chunk_tokens=200, overlap_tokens=32,
                        max_tokens=256)
    assert [(c.heading_path, c.page_number) for c in chunks] == [(("Leave",), 1), (("Leave", "Sick leave"), 2)]
    assert chunks[1].header == "Handbook — Leave > Sick leave"
    assert chunks[1].embed_text.startswith("Handbook — Leave > Sick leave\n")


def test_a_heading_alone_joins_the_next_section() -> None:
    extracted = extract("markdown", b"# Policies\n\n## Travel\n\nBook economy class.")
    chunks = chunk_text(extracted, title="Policies", tokenizer=TOKENIZER, chunk_tokens=200, overlap_tokens=32,
                        max_tokens=256)
    assert len(chunks) == 1
    assert chunks[0].text.startswith("Policies")
    assert chunks[0].heading_path == ("Policies", "Travel")


def test_the_header_drops_headings_that_repeat_the_title() -> None:
    assert contextual_header("Handbook", ("Handbook", "Leave")) == "Handbook — Leave"
    assert contextual_header("", ()) == ""


@pytest.mark.parametrize(("size", "overlap"), [(8, 0), (64, 32), (64, 40)])
def test_settings_that_leave_no_room_are_refused(size: int, overlap: int) -> None:
    builder = TextBuilder()
    builder.paragraph("text")
    with pytest.raises(ValueError):
        chunk_text(builder.build(), title="", tokenizer=TOKENIZER, chunk_tokens=size, overlap_tokens=overlap,
                   max_tokens=256)


def _embed_ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=True, truncation=True, max_length=256)["input_ids"]


def test_chunks_carry_the_model_input_of_their_embed_text_from_the_chunkers_own_tokens() -> None:
    builder = TextBuilder()
    builder.heading(1, "Travel policy")
    builder.paragraph(_sentences(40) + " Café naïve façade, e-mail: ops@example.com (ISO-8601); 3.5% ≥ 2½.")
    builder.heading(2, "Approvals")
    builder.paragraph(_sentences(30, prefix="Rule"))
    chunks = chunk_text(builder.build(), title="Handbook", tokenizer=TOKENIZER, chunk_tokens=64,
                        overlap_tokens=16, max_tokens=256)
    assert len(chunks) > 6 and all(c.header for c in chunks)
    for chunk in chunks:
        assert chunk.input_ids is not None  # every window here starts and ends between words
        assert list(chunk.input_ids) == _embed_ids(chunk.embed_text)


def test_a_window_cut_inside_a_word_carries_no_input_ids() -> None:
    # No sentence boundary and words of several WordPiece tokens each: windows of 16 tokens end
    # inside words, where the chunk's text on its own could tokenize differently.
    words = "pseudopseudohypoparathyroidism and antidisestablishmentarianism differ "
    extracted = extract("text", (words * 20).encode())
    chunks = chunk_text(extracted, title="", tokenizer=TOKENIZER, chunk_tokens=16, overlap_tokens=4, max_tokens=256)
    cut = [c for c in chunks if c.input_ids is None]
    whole = [c for c in chunks if c.input_ids is not None]
    assert cut, "some window must end inside a word"
    assert whole, "the window that ends with the text ends between words"
    for chunk in whole:
        assert list(chunk.input_ids or ()) == _embed_ids(chunk.embed_text)
    # A header that had to be cut is not reused either.
    long_title = chunk_text(extract("text", b"One short sentence."), title="Title word " * 40, tokenizer=TOKENIZER,
                            chunk_tokens=64, overlap_tokens=0, max_tokens=256)
    assert long_title[0].input_ids is None
