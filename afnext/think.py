"""Split the model's streamed text into reasoning and answer, and reasoning into timed steps.

The Think checkpoint (or Instruct prompted to reason) writes
``<think>\\n...reasoning...\\n</think>\\nanswer``. The tags are plain text, so they arrive cut
anywhere across deltas ("<thi", "nk>"). Rules:

- Reasoning starts only with ``<think>`` at the very start of the output (leading whitespace
  allowed), or from the first character when ``started=True`` (the engine pre-filled the tag;
  a repeated ``<think>`` is then dropped). Otherwise everything is answer.
- ``</think>`` ends the reasoning; a stray one in the answer is dropped, never shown. A ``<think>``
  inside reasoning is dropped too, and a second ``<think>`` block before any answer text is more
  reasoning (never spoken); later in the answer the tag is text, as it is at the output's start.
- Reasoning and answer never start with whitespace, and reasoning never ends with it.
- Text is emitted as soon as it cannot be the start of a tag; only such a tail is held back.
- Linear in the output however it is cut into deltas (one character each, long runs of spaces).

Steps: the reasoning is cut into sentences (at ``.``/``!``/``?`` followed by whitespace, at CJK
``。！？``, or at a newline, so "10.7s" never breaks). Each time a sentence mentions becomes a
``ThinkStep(start, end, sentence)`` ("barks at 0:12 and again at 0:45": two steps, each playing
from its own time), emitted once the sentence is complete; which words are times, and how they are
clamped to the clip, is times.py's. With ``steps_from_answer`` the answer's sentences count too
(Instruct writes "At 0:12 ..." without reasoning).
"""

from __future__ import annotations

import re

from afnext.events import ReasoningDelta, TextDelta, ThinkStep
from afnext.times import find_times

Event = ReasoningDelta | TextDelta | ThinkStep

_OPEN, _CLOSE = "<think>", "</think>"

# A sentence ends at .!? before whitespace (so never inside "10.7"), at CJK 。！？, or at a newline.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s)|[。！？]+(?=[^。！？])|\n")  # a run ends once past it


class _Steps:
    """Cuts a stream of text into sentences and turns the timed ones into steps.

    Linear in the text however it is cut: a delta is searched once (with the character before it,
    for ". " cut in two), and a sentence's pieces are joined once, when it ends."""

    def __init__(self, clip_duration_s: float | None) -> None:
        self._clip = clip_duration_s
        self._pieces: list[str] = []  # the sentence so far
        self._last = ""  # its last character

    def feed(self, text: str) -> list[ThinkStep]:
        if not _SENTENCE_END.search(self._last + text):
            self._pieces.append(text)
            self._last = (self._last + text)[-1:]
            return []
        pending = "".join(self._pieces) + text
        steps, begin = [], 0
        for match in _SENTENCE_END.finditer(pending, max(0, len(pending) - len(text) - 1)):
            steps += self._step(pending[begin : match.end()])
            begin = match.end()
        self._pieces, self._last = [pending[begin:]], pending[-1:]
        return steps

    def flush(self) -> list[ThinkStep]:
        sentence, self._pieces, self._last = "".join(self._pieces), [], ""
        return self._step(sentence)

    def _step(self, sentence: str) -> list[ThinkStep]:
        times = dict.fromkeys(find_times(sentence, self._clip))  # each once, in the sentence's order
        return [ThinkStep(start=start, end=end, text=sentence.strip()) for start, end in times]


class ThinkParser:
    """Incremental splitter: feed text deltas, get reasoning, answer and step events back.

    ``started``: the engine already wrote ``<think>``, so output begins inside reasoning.
    ``clip_duration_s``: clamp step times to the clip (seconds). ``steps_from_answer``: timed
    answer sentences become steps too.
    """

    def __init__(
        self,
        *,
        started: bool = False,
        clip_duration_s: float | None = None,
        steps_from_answer: bool = False,
    ) -> None:
        self._started = started
        # "start" (deciding) -> "reason" -> "after" (deciding: more reasoning or the answer) -> "answer"
        self._mode = "start"
        self._pending = ""  # raw text not yet routed: at most a possible tag
        self._reasoning: list[str] = []  # pieces, joined when asked for: appending stays linear
        self._held_space: list[str] = []  # reasoning's trailing whitespace, dropped if reasoning ends
        self._answer: list[str] = []
        self._steps: list[ThinkStep] = []
        self._reason_steps = _Steps(clip_duration_s)
        self._answer_steps = _Steps(clip_duration_s) if steps_from_answer else None
        self._closed = False

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    @property
    def steps(self) -> list[ThinkStep]:
        return list(self._steps)

    def feed(self, delta: str) -> list[Event]:
        """Route one delta; returns the events it completes, in order."""
        assert not self._closed, "feed() after close()"
        self._pending += delta
        return self._drain(final=False)

    def close(self) -> list[Event]:
        """End of output: flush held-back text and the last sentence's step."""
        assert not self._closed, "close() twice"
        events = self._drain(final=True)
        if self._mode == "reason":  # reasoning never closed: all of it was reasoning
            events += self._end_reasoning()
        if self._answer_steps is not None:
            events += self._record(self._answer_steps.flush())
        self._closed = True
        return events

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._mode in ("start", "after") and not self._decide(final):
                return events
            if self._mode == "reason":
                cut, tag = _find_tag(self._pending)
                if cut < 0:
                    return events + self._reason(self._release(final, _OPEN))
                events += self._reason(self._pending[:cut])
                self._pending = self._pending[cut + len(tag) :]
                if tag == _CLOSE:  # a repeated <think> inside reasoning is dropped, never shown
                    events += self._end_reasoning()
                    self._mode = "after"
                continue
            if self._mode == "answer":
                cut = self._pending.find(_CLOSE)  # a stray closing tag: drop it
                if cut < 0:
                    return events + self._speak(self._release(final))
                events += self._speak(self._pending[:cut])
                self._pending = self._pending[cut + len(_CLOSE) :]

    def _decide(self, final: bool) -> bool:
        """Choose reasoning or answer from the output's start (or, after reasoning, the answer's:
        a second ``<think>`` block before any answer is reasoning too); False while it can't tell."""
        self._pending = self._pending.lstrip()  # dropped either way: keeps a long run of it linear
        if self._pending.startswith(_OPEN):
            self._pending = self._pending[len(_OPEN) :]
            if self._mode == "after":
                self._held_space = ["\n\n"]  # the two blocks read as paragraphs of one reasoning
            self._mode = "reason"
        elif _OPEN.startswith(self._pending) and not final:
            return False
        else:
            self._mode = "reason" if self._mode == "start" and self._started else "answer"
        return True

    def _release(self, final: bool, other_tag: str = "") -> str:
        """Take all pending text except a tail that could still grow into ``</think>`` (or
        ``other_tag``)."""
        keep = 0 if final else max(_tag_prefix_len(self._pending, _CLOSE), _tag_prefix_len(self._pending, other_tag))
        text = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(text) :]
        return text

    def _reason(self, text: str) -> list[Event]:
        steps = self._reason_steps.feed(text)
        if not self._reasoning:
            text = text.lstrip()
        body = text.rstrip()
        if not body:  # only whitespace: held until text follows it
            self._held_space.append(text)
            return self._record(steps)
        shown = "".join(self._held_space) + body if self._reasoning else body
        self._held_space = [text[len(body) :]]
        self._reasoning.append(shown)
        return [ReasoningDelta(shown), *self._record(steps)]

    def _end_reasoning(self) -> list[Event]:
        self._held_space = []
        return self._record(self._reason_steps.flush())

    def _speak(self, text: str) -> list[Event]:
        if not self._answer:
            text = text.lstrip()
        if not text:
            return []
        self._answer.append(text)
        steps = self._answer_steps.feed(text) if self._answer_steps else []
        return [TextDelta(text), *self._record(steps)]

    def _record(self, steps: list[ThinkStep]) -> list[Event]:
        self._steps += steps
        return list(steps)


def _find_tag(text: str) -> tuple[int, str]:
    """Where the first ``<think>`` or ``</think>`` in ``text`` is, and which; (-1, "") if none."""
    found = [(at, tag) for tag in (_OPEN, _CLOSE) if (at := text.find(tag)) >= 0]
    return min(found) if found else (-1, "")


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):  # an empty tag: range() is empty
        if tag.startswith(text[-size:]):
            return size
    return 0


def split_think(
    text: str,
    *,
    started: bool = False,
    clip_duration_s: float | None = None,
    steps_from_answer: bool = False,
) -> tuple[str, str, list[ThinkStep]]:
    """One-shot split of a whole output: (reasoning, answer, steps), same as streaming it."""
    parser = ThinkParser(
        started=started, clip_duration_s=clip_duration_s, steps_from_answer=steps_from_answer
    )
    parser.feed(text)
    parser.close()
    return parser.reasoning, parser.answer, parser.steps
