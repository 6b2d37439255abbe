"""Splitting extracted text into chunks measured in the embedding model's own tokens.

Each chunk stays inside one section (so it has one heading path) and, together with its
contextual header (document title and headings, which is embedded with it), fits the model's
maximum input: ``header + text + [CLS] + [SEP] <= max_tokens``; nothing is ever truncated.
Chunk ends snap back to a sentence or paragraph boundary when one lies in the second half of
the window; consecutive chunks of a long section overlap by ``overlap_tokens``.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from knowledge.extraction import ExtractedText

# The header (title and headings) may use at most this many tokens of the model's input.
MAX_HEADER_TOKENS = 48
# Special tokens the model adds to every input ([CLS] and [SEP] for BERT-family models).
SPECIAL_TOKENS = 2
_BOUNDARY = re.compile(r"(?<=[.!?;:])\s+|\n+")


@dataclass(frozen=True)
class ChunkDraft:
    """A chunk before it is embedded and stored. Offsets index ``ExtractedText.text``."""

    ordinal: int
    text: str
    heading_path: tuple[str, ...]
    page_number: int | None
    char_start: int
    char_end: int
    token_count: int
    header: str
    # The model's input for ``embed_text`` ([CLS] header text [SEP]) cut from the chunker's own
    # tokenization, or None where that could differ from tokenizing ``embed_text`` (``chunk_text``).
    input_ids: tuple[int, ...] | None = None

    @property
    def embed_text(self) -> str:
        """What the embedding model sees: the contextual header, then the chunk."""
        return f"{self.header}\n{self.text}" if self.header else self.text


def contextual_header(title: str, heading_path: tuple[str, ...]) -> str:
    """``title — heading > subheading``, without headings that repeat the title."""
    parts = [h for h in heading_path if h.strip().lower() != title.strip().lower()]
    return " — ".join(p for p in (title.strip(), " > ".join(parts)) if p)


def _fit_header(header: str, tokenizer: Any) -> tuple[str, int, list[int] | None]:
    """The header cut to ``MAX_HEADER_TOKENS``, its token count, and its token ids when it is
    whole (a cut header may tokenize differently on its own, so it has none)."""
    if not header:
        return "", 0, []
    encoded = tokenizer(header, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if len(ids) <= MAX_HEADER_TOKENS:
        return header, len(ids), list(ids)
    end = encoded["offset_mapping"][MAX_HEADER_TOKENS - 1][1]
    return header[:end], MAX_HEADER_TOKENS, None


def chunk_text(
    extracted: ExtractedText,
    *,
    title: str,
    tokenizer: Any,
    chunk_tokens: int,
    overlap_tokens: int,
    max_tokens: int,
) -> list[ChunkDraft]:
    """Split ``extracted`` into chunks of at most ``chunk_tokens`` tokens (fewer when the header
    needs room), overlapping by ``overlap_tokens``.

    Raises ``ValueError`` when the settings leave no room for text (``overlap_tokens`` must be
    smaller than half the chunk size).
    """
    if chunk_tokens < 16:
        raise ValueError("chunk size must be at least 16 tokens")
    if overlap_tokens * 2 >= chunk_tokens:
        raise ValueError("overlap must be less than half the chunk size")
    drafts: list[ChunkDraft] = []
    text = extracted.text
    # The special tokens around a model input ([CLS] and [SEP] for BERT-family tokenizers).
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    carry_start: int | None = None  # a heading-only section is prepended to the next one
    for position, section in enumerate(extracted.sections):
        start = section.start if carry_start is None else carry_start
        body = text[start:section.end]
        last = position == len(extracted.sections) - 1
        if section.heading_path and body.strip() == section.heading_path[-1] and not last:
            carry_start = start
            continue
        carry_start = None
        header, header_tokens, header_ids = _fit_header(contextual_header(title, section.heading_path), tokenizer)
        budget = min(chunk_tokens, max_tokens - SPECIAL_TOKENS - header_tokens - (1 if header else 0))
        encoded = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
        offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]  # type: ignore[misc]
        if not offsets:
            continue
        ids, words = encoded["input_ids"], encoded.word_ids()
        boundaries = sorted({m.end() for m in _BOUNDARY.finditer(body)})
        token_starts = [o[0] for o in offsets]
        for first, stop in _windows(token_starts, offsets, boundaries, budget, overlap_tokens):
            char_start, char_end = start + offsets[first][0], start + offsets[stop - 1][1]
            # A window that starts and ends on word boundaries holds the tokens its text gets on
            # its own (the tokenizer splits words at whitespace and punctuation before WordPiece),
            # so the encoder can take them instead of tokenizing the chunk again. A window cut
            # inside a word ("embed|ding") could tokenize differently, and gets none.
            whole_words = ((first == 0 or words[first] != words[first - 1])
                           and (stop == len(ids) or words[stop] != words[stop - 1]))
            input_ids = (tuple([cls, *header_ids, *ids[first:stop], sep])
                         if whole_words and header_ids is not None and cls is not None and sep is not None
                         else None)
            drafts.append(ChunkDraft(
                ordinal=len(drafts),
                text=text[char_start:char_end],
                heading_path=section.heading_path,
                page_number=extracted.page_at(char_start),
                char_start=char_start,
                char_end=char_end,
                token_count=stop - first,
                header=header,
                input_ids=input_ids,
            ))
    return drafts


def _windows(token_starts: list[int], offsets: list[tuple[int, int]], boundaries: list[int], budget: int,
             overlap: int) -> list[tuple[int, int]]:
    """Token windows ``[first, stop)`` covering all tokens, each at most ``budget`` long."""
    total = len(offsets)
    windows: list[tuple[int, int]] = []
    first = 0
    while first < total:
        stop = min(first + budget, total)
        if stop < total:
            # The last sentence boundary in the second half of the window, if any.
            low, high = offsets[first + budget // 2][0], offsets[stop][0]
            index = bisect.bisect_right(boundaries, high) - 1
            if index >= 0 and boundaries[index] > low:
                stop = max(first + 1, bisect.bisect_left(token_starts, boundaries[index]))
        windows.append((first, stop))
        if stop >= total:
            break
        nxt = max(stop - overlap, first + 1)
        # Do not start inside a word: move to the next token that follows a space.
        while nxt < stop and offsets[nxt][0] == offsets[nxt - 1][1]:
            nxt += 1
        first = nxt
    return windows
