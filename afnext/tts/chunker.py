"""Streamed answer text → speakable pieces, each released the moment its clause or sentence is complete.

The first piece of a turn may end at the first clause break (`,` `;` `:`, `，` `、` `；` `：` or a
spaced dash) once it has a few words, so speech starts early; later pieces are whole sentences, or
clauses only when a sentence runs long, so the synthesizer gets enough text for natural prosody. Line
breaks always end a piece (markdown lists, headings). Markdown symbols and emoji are stripped from what
will be spoken. Arabic's `؟` `،` `؛` count as `?` `,` `;`. A spaced dash between numbers is a minus or a
range ("10 - 3", "[12.5 - 15.0]"), never a break; a period after a number is a list marker only where a
line or sentence opens ("1. Preheat", not "…all, 42. Done"), and after one letter it ends the sentence
unless the letter is an initial ("J. Smith", not "a, b, c. Done").

Scripts written without spaces (Chinese, Japanese) end sentences and clauses with marks that need
no space after them (`。` `！` `？` `，` `、`); their characters count double towards the length limits
(as they do on a terminal: one carries about as much speech as two or three Latin letters), and a
piece with no space in it may be cut at any character.

Every decision depends only on the text, never on how it was split into deltas: where a decision
needs text that has not arrived yet (the character after a period, say), the chunker waits. So any
split of the same answer gives the same pieces (tests feed every split position).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from ..events import TextDelta

SENTENCE_ENDS = ".!?…؟۔"  # with Arabic's question mark and Urdu's full stop (both spaced as Latin ones)
CLAUSE_ENDS = ",;:،؛"  # with Arabic's comma and semicolon
QUESTIONS_EXCLAIMS = "!?؟"  # sentence ends that are never inside an abbreviation or a number
# Ends that are never inside a token, so need no space after them: full-width (CJK) and Devanagari.
FULL_STOPS = "。！？｡।॥"
FULL_CLAUSE_ENDS = "，、；：､"
DASHES = "—–-"
# May follow a sentence end and belong to it: quotes (German „…“ and »…« close with “ and «), brackets (CJK
# ones too), markdown emphasis.
CLOSERS = "\"'”’“‘«»›)]*_」』）】〕》〉"
# French closes a quotation with a space before its guillemet: « Bonjour. » belongs to the sentence it ends.
SPACED_CLOSERS = "»›"
# Words whose trailing period does not end a sentence even before a capital ("Dr. Smith", "e.g. Paris").
ABBREVIATIONS = frozenset("mr mrs ms dr prof st sr jr mt vs cf al approx fig vol ca pp "
                          "gen lt sgt capt col rev hon gov sen "  # titles before a name ("Gen. Patton")
                          "bzw evtl ggf inkl zzgl vgl sog hr fr str".split())  # German ("vgl. Kapitel 3")
# German writes ordinals with a period ("am 3. Oktober", "im 19. Jahrhundert"): after one of these words a
# number's period does not end a sentence ("I am 42. Then" stays one piece: harmless).
ORDINAL_CUES = frozenset("am im vom zum zur beim ab bis seit der die das den dem des".split())
CURRENCY_SIGNS = "$€£¥"
# Before a number, a short capitalised word's period does not end a sentence either ("No. 5", "Sec. 3"),
# nor a month's ("Sept. 5", "Jan. 12": "Sept" is four letters).
NUMBER_LABEL_MAX_CHARS = 3
MONTHS = frozenset("jan feb mar apr jun jul aug sep sept oct nov dec".split())

_WAIT, _NONE = -1, 0  # _decide's answers besides "the piece ends here" (a position > 0)
# A code fence, with its language tag when it opens the line ("```python"); mid-line, "```x```" keeps x.
_FENCE = re.compile(r"^\s*```[^\s`]*|```")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # [text](url) and ![alt](url) → text
_LINE_MARK = re.compile(r"^\s*(?:[-*+•]|#{1,6}|>)\s+")  # bullet, heading or quote marker opening a line
# Code, tables, strike-through; underscores at word edges only; asterisks that touch a word (emphasis),
# not those between spaces or digits ("2 * 3", "5*4": arithmetic is spoken).
_SYMBOLS = re.compile(r"[`|~]|(?<!\w)_+|_+(?!\w)|\*+(?![\s\d*]|$)|(?<![\s\d*])\*+")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")  # "J", "U.S", "e.g" (the last period already cut)
# Lone surrogates (undecodable command-line bytes, a JSON "\ud800") have no sound and no UTF-8 form;
# espeak-ng's encoding and the Pocket tokenizer would both fail on them.
_SURROGATES = re.compile("[\ud800-\udfff]")
# Emoji and pictographs, with the whitespace before them: espeak-ng reads 😀 as "grinning face" and ✅ as
# "white heavy check mark". Skin tones, flags, keycaps (1️⃣ keeps its digit) and ZWJ sequences included;
# music signs (C♯), arrows and ° are not emoji and stay.
_EMOJI = re.compile("\\s*(?:[\U0001F000-\U0001FAFF\u2600-\u2668\u2670-\u27BF\u2B00-\u2BFF\u231A\u231B"
                    "\u23E9-\u23FA\uFE0E\uFE0F\u200D\u20E3\U000E0020-\U000E007F])+")


@dataclass(frozen=True)
class ChunkerOptions:
    """Where pieces may end."""

    first_min_words: int = 3  # the first piece may end at a clause break once it has this many words
    clause_min_chars: int = 100  # later pieces end at a clause break only when at least this long
    max_chars: int = 250  # a piece with no break at all is cut at the next space past this length
    first_max_chars: int = 80  # the same for the first piece, so the voice starts soon whatever the text


class SpeechChunker:
    """Feed it the answer's `TextDelta`s; it returns the pieces that became complete, ready to speak.

    One chunker per turn: `flush()` at the end of the answer returns the rest and resets it.
    """

    def __init__(self, options: ChunkerOptions = ChunkerOptions()) -> None:
        self.options = options
        self._text = ""  # text not yet released; the current piece starts at 0
        self._scan = 0  # positions before this are decided: no piece ends there
        self._emitted = 0  # non-empty pieces released this turn
        self._mid_sentence = False  # the current piece starts after a clause break or a length cut
        self._tail = ""  # then the last two words before that cut ("A, B,"), for the piece's first words

    def feed(self, delta: TextDelta) -> list[str]:
        """Add answer text; return the pieces completed by it (often none).

        Raises TypeError for anything but a `TextDelta`: reasoning is never spoken.
        """
        if not isinstance(delta, TextDelta):
            raise TypeError(f"SpeechChunker speaks answer text only (TextDelta), not {type(delta).__name__}")
        self._text += delta.text
        return self._pieces(final=False)

    def flush(self) -> list[str]:
        """The answer is over: return every remaining piece and start afresh."""
        pieces = self._pieces(final=True)
        last = speakable(self._text)
        if last:
            pieces.append(last)
        self._text, self._scan, self._emitted, self._mid_sentence, self._tail = "", 0, 0, False, ""
        return pieces

    def _pieces(self, final: bool) -> list[str]:
        pieces = []
        i = self._scan
        while i < len(self._text):
            end = self._decide(i, final)
            if end == _WAIT:
                break
            if end == _NONE:
                i += 1
                continue
            piece = speakable(self._text[:end])
            if piece:
                pieces.append(piece)
                self._emitted += 1
            cut = self._text[:end].rstrip(" \t" + CLOSERS)
            self._mid_sentence = not cut.endswith(("\n", *SENTENCE_ENDS, *FULL_STOPS))
            self._tail = " ".join(cut.split()[-2:]) if self._mid_sentence else ""
            self._text, i = self._text[end:], 0
        self._scan = i
        return pieces

    def _decide(self, i: int, final: bool) -> int:
        """Does the current piece end at or just after `self._text[i]`? Its end, _NONE or _WAIT."""
        text, char = self._text, self._text[i]
        if char == "\n":
            return i + 1
        if char in SENTENCE_ENDS or char in FULL_STOPS:
            return self._sentence_end(i, final)
        if char in FULL_CLAUSE_ENDS:
            return i + 1 if self._clause_allowed(text[:i]) else _NONE
        if char in CLAUSE_ENDS or (char in DASHES and i > 0 and text[i - 1] == " "):
            if not self._clause_allowed(text[:i]):
                return _NONE
            if char in DASHES and text[:i].rstrip()[-1:].isdigit():
                return self._after_number_dash(i, final)
            if i + 1 == len(text):
                return i + 1 if final else _WAIT
            return i + 1 if text[i + 1].isspace() else _NONE
        limit = self.options.max_chars if self._emitted else self.options.first_max_chars
        before = text[:i].strip()
        if _width(before) >= limit and (char.isspace() or not any(c.isspace() for c in before)):
            return i  # at a space; or anywhere in text without spaces (Chinese), lest it wait for the end
        return _NONE

    def _after_number_dash(self, i: int, final: bool) -> int:
        """At a spaced dash after a number: a range or a minus ("10 - 3", "[12.5 - 15.0]", "$5 - $10")
        when a number follows, never a break; a clause break otherwise ("in 2023 - the year")."""
        text, after = self._text, i + 1
        if after < len(text) and not text[after].isspace():
            return _NONE  # "10 -3": no spaced dash
        while after < len(text) and text[after] in " \t" + CURRENCY_SIGNS:
            after += 1
        if after == len(text):
            return i + 1 if final else _WAIT
        return _NONE if text[after].isdigit() else i + 1

    def _sentence_end(self, i: int, final: bool) -> int:
        """At a `.!?…` (or `。！？।`): the piece ends after its run of ends and closers, if what follows
        says so."""
        text = self._text
        end = i
        while end < len(text) and (text[end] in SENTENCE_ENDS or text[end] in FULL_STOPS or text[end] in CLOSERS):
            end += 1
        if end == len(text):
            return end if final else _WAIT
        if any(c in FULL_STOPS for c in text[i:end]) or _wide(text[end]):
            return end  # "好。我们", "好!我们": no space is due after it
        if not text[end].isspace():  # "3.5", "e.g", "example.com", "?q=1": inside a token
            return _NONE
        after = end
        while after < len(text) and text[after].isspace() and text[after] != "\n":
            after += 1
        if after == len(text):
            return end if final else _WAIT
        if text[after] in SPACED_CLOSERS:  # "Bonjour. »": a French closing guillemet, if a space or the end follows
            if after + 1 == len(text):
                return after + 1 if final else _WAIT
            if text[after + 1].isspace():
                return after + 1
        if any(c in QUESTIONS_EXCLAIMS for c in text[i:end]) or text[after] == "\n":
            return end
        if text[after].islower() or self._is_abbreviation(text[:i], text[after]):
            return _NONE  # "e.g. the", "Wait... so", "Dr. Smith", "1. Preheat", "No. 5"
        return end

    def _is_abbreviation(self, before: str, following: str) -> bool:
        """Whether the period after `before` (the piece so far), with `following` the next character
        past the space, belongs to a word, not a sentence."""
        words = before.split()
        if not words:
            return True
        word = words[-1].strip("\"'“‘(*_[").rstrip(".")
        if word.isdigit():
            # A numbered-list marker ("1. Preheat") opens a line or sentence; after a clause break "42." ends one.
            # A German ordinal follows an article or preposition ("am 3. Oktober").
            return (len(words) == 1 and not self._mid_sentence) or (
                len(words) > 1 and words[-2].strip("\"'(*_").lower() in ORDINAL_CUES)
        if word.lower() in ABBREVIATIONS:
            return True
        if len(word) == 1 and word.isalpha() and not following.isdigit():
            # An initial ("J. Smith") is a capital; "a, b, c. Done" and "A, B or C. Done" end sentences.
            return word.isupper() and not _ends_letter_list(f"{self._tail} {before}".split())
        if following.isdigit() and word.isalpha() and word[0].isupper() and (
                len(word) <= NUMBER_LABEL_MAX_CHARS or word.lower() in MONTHS):
            return True  # "No. 5", "Sec. 3", "Ch. 2", "Sept. 5" (but "in 1990. 30 years" ends a sentence)
        return bool(_INITIALS.fullmatch(word)) and (len(word) == 1 or "." in word)  # "J.", "U.S.", "e.g."

    def _clause_allowed(self, before: str) -> bool:
        """May the current piece end at a clause break, given what it holds so far?"""
        if self._emitted == 0:
            # Wide characters count half a word each: "今天天气很好" is three.
            words = [w for w in before.split() if any(c.isalnum() for c in w) and not _wide(w[-1])]
            return len(words) + sum(map(_wide, before)) / 2 >= self.options.first_min_words
        return _width(before.strip()) >= self.options.clause_min_chars


def _ends_letter_list(words: list[str]) -> bool:
    """Whether the last word is the last item of a list of single letters: "A, B, C", "a, b or c"."""
    before = [w.strip("\"'(*_[") for w in words[-3:-1]]
    if before and before[-1].lower() in ("and", "or", "&"):  # "A, B or C", "a and c"
        return len(before) == 2 and len(before[0].rstrip(",")) == 1 and before[0][0].isalpha()
    return bool(before) and len(before[-1]) == 2 and before[-1][0].isalpha() and before[-1][1] == ","  # "A, C"


def _wide(char: str) -> bool:
    """A character of a script written without spaces, or its full-width punctuation (CJK)."""
    return unicodedata.east_asian_width(char) in "WF"


def _width(text: str) -> int:
    """Length for the limits: wide characters count double."""
    return len(text) + sum(map(_wide, text))


def speakable(text: str) -> str:
    """`text` without markdown symbols, on one line; "" when nothing in it can be spoken."""
    text = _LINK.sub(r"\1", _FENCE.sub(" ", text))
    text = _SYMBOLS.sub("", _LINE_MARK.sub("", text, count=1))
    text = " ".join(_EMOJI.sub("", _SURROGATES.sub("", text)).split())
    return text if any(c.isalnum() for c in text) else ""


__all__ = ["ChunkerOptions", "SpeechChunker", "speakable"]
