"""Split the model's streamed text into reasoning and answer, and reasoning into timed steps.

The Think checkpoint (or Instruct prompted to reason) writes
``<think>\\n...reasoning...\\n</think>\\nanswer``. The tags are plain text, so they arrive cut
anywhere across deltas ("<thi", "nk>"). Rules:

- Reasoning starts only with ``<think>`` at the very start of the output (leading whitespace
  allowed), or from the first character when ``started=True`` (the engine pre-filled the tag;
  a repeated ``<think>`` is then dropped). Otherwise everything is answer.
- ``</think>`` ends the reasoning; a stray one in the answer is dropped, never shown.
- Reasoning and answer never start with whitespace, and reasoning never ends with it.
- Text is emitted as soon as it cannot be the start of a tag; only such a tail is held back.

Steps: the reasoning is cut into sentences (at ``.``/``!``/``?`` followed by whitespace, or at a
newline, so "10.7s" never breaks). A sentence that mentions a time becomes
``ThinkStep(start, end, sentence)`` from its first mention, emitted once the sentence is
complete. With ``steps_from_answer`` the answer's sentences count too (Instruct writes
"At 0:12 ..." without reasoning). Times recognised, in seconds: "10.7s to 16.9s",
"3.2 s - 5 s", "between 4 and 6 seconds", "the 30-second mark", "1:30", "1:02:03", "12 sec",
"1 min 30 s", "2 minutes", lyric ranges "[11.0 - 14.0]" and segment ASR ``<t>0.574-1.034</t>``
(minutes.seconds with tenths: 1.034 is 63.4 s). Bare numbers ("3 speakers", "75.0") are not
times. A range whose end is before its start keeps only its start. With a clip duration, times
are clamped into it; a mention starting past the end becomes the end, as a single moment.
"""

from __future__ import annotations

import re

from afnext.events import ReasoningDelta, TextDelta, ThinkStep, clock

Event = ReasoningDelta | TextDelta | ThinkStep

_OPEN, _CLOSE = "<think>", "</think>"

# A number that is not the tail of another number or clock; "1990s" is a decade, not seconds.
_NUM = r"(?<![\d.:])(?!\d{3}0s\b)\d+(?:\.\d+)?"
_SEC = r"(?:seconds?|secs?|s)\b"
_MIN = r"(?:minutes?|mins?)\b"
_CLOCK = r"(?<![\d.:])\d+(?::\d{2}){1,2}(?:\.\d+)?(?![\d:])"  # mm:ss or h:mm:ss
_MIN_SEC = rf"{_NUM}\s*(?:minutes?|mins?|m)\s*,?\s*(?:and\s+)?{_NUM}\s*{_SEC}"
_UNIT = rf"{_NUM}\s*-?\s*(?:{_SEC}|{_MIN})"  # "-?" for "the 30-second mark"
_POINT = rf"(?:{_CLOCK}|{_MIN_SEC}|{_UNIT})"
_DASH = r"[-–—]"
_CONN = rf"(?:{_DASH}|to|until|till|through)"
# "and" joins a range only after "between": "at 3 s and 5 s" is two moments.
_TIMES = re.compile(
    rf"""\[\s*(?P<lyric_a>{_CLOCK}|{_NUM})\s*{_DASH}\s*(?P<lyric_b>{_CLOCK}|{_NUM})\s*\]
    |<t>\s*(?P<seg_a>{_NUM})\s*(?:{_DASH}\s*(?P<seg_b>{_NUM})\s*)?</t>
    |(?P<btw>between\s+)?(?P<shared_a>{_NUM})\s*(?(btw)(?:and|{_CONN})|{_CONN})
        \s*(?P<shared_b>{_NUM})\s*-?\s*(?P<shared_u>{_SEC}|{_MIN})
    |(?P<btw2>between\s+)?(?P<range_a>{_POINT})\s*(?(btw2)(?:and|{_CONN})|{_CONN})
        \s*(?P<range_b>{_POINT})
    |(?P<point>{_POINT})""",
    re.IGNORECASE | re.VERBOSE,
)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_HAS_MINUTES = re.compile(r"\d\s*-?\s*min", re.IGNORECASE)
# A sentence ends at .!? before whitespace (so never inside "10.7") or at a newline.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s)|\n")


def _seconds(text: str) -> float:
    """Seconds named by one time point: a clock, minutes and seconds, number+unit, or a number."""
    if ":" in text:
        total = 0.0
        for part in text.split(":"):
            total = total * 60.0 + float(part)
        return total
    numbers = [float(n) for n in _NUMBER.findall(text)]
    if len(numbers) == 2:  # "1 min 30 s"
        return numbers[0] * 60.0 + numbers[1]
    return numbers[0] * (60.0 if _HAS_MINUTES.search(text) else 1.0)


def _segment_seconds(text: str) -> float:
    """Segment-ASR stamp "m.sss" (minutes, then ss.s); plain seconds when that cannot be."""
    minutes, _, frac = text.partition(".")
    if len(frac) >= 2:
        secs = float(frac[:2] + "." + (frac[2:] or "0"))
        if secs < 60.0:
            return int(minutes) * 60.0 + secs
    return float(text)


def _mention(match: re.Match[str]) -> tuple[float, float | None]:
    """(start, end) of one matched mention, before ordering and clamping."""
    if match["seg_a"]:
        end = match["seg_b"]
        return _segment_seconds(match["seg_a"]), _segment_seconds(end) if end else None
    if match["shared_a"]:
        scale = 60.0 if match["shared_u"].lower().startswith("m") else 1.0
        return float(match["shared_a"]) * scale, float(match["shared_b"]) * scale
    for first, last in (("lyric_a", "lyric_b"), ("range_a", "range_b")):
        if match[first]:
            return _seconds(match[first]), _seconds(match[last])
    return _seconds(match["point"]), None


def _clamp(
    start: float, end: float | None, duration: float | None
) -> tuple[float, float | None]:
    if end is not None and end < start:  # a backwards "range" is not one
        end = None
    if duration is None:
        return start, end
    duration = float(duration)
    if start >= duration:  # generated stamps overshoot; collapse onto the clip's end
        return duration, None
    return max(start, 0.0), None if end is None else min(end, duration)


def find_times(
    text: str, clip_duration_s: float | None = None
) -> list[tuple[float, float | None]]:
    """Every time mention in ``text``, in order, as (start_s, end_s or None for a moment)."""
    return [_clamp(*_mention(m), clip_duration_s) for m in _TIMES.finditer(text)]


def shift_times(text: str, offset_s: float, clip_duration_s: float | None = None) -> str:
    """`text` with each time mention rewritten as a clock time `offset_s` seconds later: a part's
    answer made to speak of the whole recording ("from 1:10 to 1:25" in a part that starts at 25:00
    becomes "from 26:10–26:25"). Times are clamped to the part first, as steps are."""
    def absolute(match: re.Match[str]) -> str:
        start, end = _clamp(*_mention(match), clip_duration_s)
        stamp = clock(start + offset_s)
        return stamp if end is None else f"{stamp}–{clock(end + offset_s)}"

    return _TIMES.sub(absolute, text)


class _Steps:
    """Cuts a stream of text into sentences and turns the timed ones into steps."""

    def __init__(self, clip_duration_s: float | None) -> None:
        self._clip = clip_duration_s
        self._pending = ""

    def feed(self, text: str) -> list[ThinkStep]:
        self._pending += text
        steps = []
        while match := _SENTENCE_END.search(self._pending):
            sentence, self._pending = self._pending[: match.end()], self._pending[match.end() :]
            steps += self._step(sentence)
        return steps

    def flush(self) -> list[ThinkStep]:
        sentence, self._pending = self._pending, ""
        return self._step(sentence)

    def _step(self, sentence: str) -> list[ThinkStep]:
        times = find_times(sentence, self._clip)
        if not times:
            return []
        return [ThinkStep(start=times[0][0], end=times[0][1], text=sentence.strip())]


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
        self._mode = "start"  # "start" (deciding) -> "reason" -> "answer"
        self._pending = ""  # raw text not yet routed: at most a possible tag
        self._reasoning = ""
        self._held_space = ""  # reasoning's trailing whitespace, dropped if reasoning ends
        self._answer = ""
        self._steps: list[ThinkStep] = []
        self._reason_steps = _Steps(clip_duration_s)
        self._answer_steps = _Steps(clip_duration_s) if steps_from_answer else None
        self._closed = False

    @property
    def reasoning(self) -> str:
        return self._reasoning

    @property
    def answer(self) -> str:
        return self._answer

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
            if self._mode == "start" and not self._decide(final):
                return events
            if self._mode == "reason":
                cut = self._pending.find(_CLOSE)
                if cut < 0:
                    return events + self._reason(self._release(final))
                events += self._reason(self._pending[:cut]) + self._end_reasoning()
                self._pending, self._mode = self._pending[cut + len(_CLOSE) :], "answer"
            if self._mode == "answer":
                cut = self._pending.find(_CLOSE)  # a stray closing tag: drop it
                if cut < 0:
                    return events + self._speak(self._release(final))
                events += self._speak(self._pending[:cut])
                self._pending = self._pending[cut + len(_CLOSE) :]

    def _decide(self, final: bool) -> bool:
        """Choose reasoning or answer from the output's start; False while it can't tell."""
        head = self._pending.lstrip()
        if head.startswith(_OPEN):
            self._pending, self._mode = head[len(_OPEN) :], "reason"
        elif _OPEN.startswith(head) and not final:
            return False
        else:
            self._mode = "reason" if self._started else "answer"
        return True

    def _release(self, final: bool) -> str:
        """Take all pending text except a tail that could still grow into ``</think>``."""
        keep = 0 if final else _tag_prefix_len(self._pending, _CLOSE)
        text = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(text) :]
        return text

    def _reason(self, text: str) -> list[Event]:
        steps = self._reason_steps.feed(text)
        body = self._held_space + (text if self._reasoning else text.lstrip())
        shown = body.rstrip()
        self._held_space = body[len(shown) :]
        self._reasoning += shown
        return ([ReasoningDelta(shown)] if shown else []) + self._record(steps)

    def _end_reasoning(self) -> list[Event]:
        self._held_space = ""
        return self._record(self._reason_steps.flush())

    def _speak(self, text: str) -> list[Event]:
        if not self._answer:
            text = text.lstrip()
        if not text:
            return []
        self._answer += text
        steps = self._answer_steps.feed(text) if self._answer_steps else []
        return [TextDelta(text), *self._record(steps)]

    def _record(self, steps: list[ThinkStep]) -> list[Event]:
        self._steps += steps
        return list(steps)


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
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
