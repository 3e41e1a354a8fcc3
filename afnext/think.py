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
from its own time), emitted once the sentence is complete. With ``steps_from_answer`` the answer's sentences count too (Instruct writes
"At 0:12 ..." without reasoning). Times recognised, in seconds: "10.7s to 16.9s",
"3.2 s - 5 s", "between 4 and 6 seconds", "the 30-second mark", "1:30", "1:02:03", "12 sec",
"12,5 s" (decimal comma), "1 min 30 s", "2 minutes", "1h02m03s", "1.5 hours", "0:12 -> 0:15",
subtitle cues "00:01:02,500 --> 00:01:04,000", "12秒到15秒", "1分30秒", "the first 10 seconds"
(0-10 s), "the last 10 seconds" (with a clip duration), lyric ranges "[11.0 - 14.0]" and segment ASR
``<t>0.574-1.034</t>`` (minutes.seconds with tenths: 1.034 is 63.4 s). Not times: bare numbers
("3 speakers", "75.0"), times of day ("3:30 pm"), impossible clocks ("0:75"), and lengths ("lasts
3 seconds", "a 2-second pause", "10 seconds later"): a step there would play from the wrong second.
A range whose end is before its start keeps only its start. With a clip duration, times are
clamped into it; a mention starting past the end becomes the end, as a single moment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace

from afnext.events import ReasoningDelta, TextDelta, ThinkStep, clock

Event = ReasoningDelta | TextDelta | ThinkStep

_OPEN, _CLOSE = "<think>", "</think>"

# A number that is not the tail of another number or clock; "1990s" is a decade, not seconds. A
# decimal comma ("12,5 s") has one or two digits after it: "1,500" is a thousands separator.
_NUM = r"(?<![\d.:])(?<!\d,)(?!\d{3}0s\b)\d+(?:\.\d+|,\d{1,2}(?!\d))?"
_END = r"(?![a-z])"  # a unit is a whole word ("12 s" but not "12 sand"); CJK units need no end
_SEC = rf"(?:(?:seconds?|secs?|s){_END}|秒钟?)"
_MIN = rf"(?:(?:minutes?|mins?){_END}|分钟|分(?!之))"  # a bare "m" is metres, but "1m30s" is not
_HOUR = rf"(?:(?:hours?|hrs?|h){_END}|小时)"
# mm:ss or h:mm:ss; not "0:75", not a time of day ("3:30 pm"), not "16:9".
_CLOCK = r"(?<![\d.:])\d+(?::[0-5]\d){1,2}(?:[.,]\d+)?(?![\d:]|[.,]\d)(?!\s*[ap]\.?m\b)"
_AND = r"\s*,?\s*(?:and\s+)?"
_H_PART = rf"{_NUM}\s*(?:hours?|hrs?|h|小时){_END}"
_M_PART = rf"{_NUM}\s*(?:minutes?|mins?|m|分钟|分){_END}"
_S_PART = rf"{_NUM}\s*{_SEC}"
_COMPOUND = rf"{_H_PART}{_AND}(?:{_M_PART}(?:{_AND}{_S_PART})?|{_S_PART})|{_M_PART}{_AND}{_S_PART}"
_UNIT = rf"{_NUM}\s*-?\s*(?:{_SEC}|{_MIN}|{_HOUR})"  # "-?" for "the 30-second mark"
_POINT = rf"(?:{_CLOCK}|{_COMPOUND}|{_UNIT})"
_DASH = r"(?:-+>|→|[-–—~～])"  # "~" joins a range in CJK text ("12~15秒")
_CONN = rf"(?:{_DASH}|to|until|till|through|到|至)"
_HEDGE = (r"(?:(?:about|around|roughly|approximately|approx\.|nearly|almost|just|only|some|over|under"
          r"|less\s+than|more\s+than|at\s+least|at\s+most|up\s+to)\s+|[~≈]\s*)*")
# "and" joins a range only after "between": "at 3 s and 5 s" is two moments.
_TIMES = re.compile(
    rf"""\[\s*(?P<lyric_a>{_CLOCK}|{_NUM})\s*{_DASH}\s*(?P<lyric_b>{_CLOCK}|{_NUM})\s*\]
    |<t>\s*(?P<seg_a>{_NUM})\s*(?:{_DASH}\s*(?P<seg_b>{_NUM})\s*)?</t>
    |\b(?:(?:the|its)\s+)?(?:first|opening|initial)\s+{_HEDGE}(?P<head>{_UNIT})
    |\b(?:(?:the|its)\s+(?:last|final|closing)|final|closing)\s+{_HEDGE}(?P<tail>{_UNIT})
    |(?P<btw>between\s+)?(?P<shared_a>{_NUM})\s*(?(btw)(?:and|{_CONN})|{_CONN})
        \s*(?P<shared_b>{_NUM})\s*-?\s*(?P<shared_u>{_SEC}|{_MIN}|{_HOUR})
    |(?P<btw2>between\s+)?(?P<range_a>{_POINT})\s*(?(btw2)(?:and|{_CONN})|{_CONN})
        \s*(?P<range_b>{_POINT})
    |(?P<point>{_POINT})""",
    re.IGNORECASE | re.VERBOSE,
)
_AMOUNT = re.compile(r"(\d+(?:[.,]\d+)?)\s*-?\s*([^\W\d_]*)")  # a number and the unit after it
# A length is no moment: "lasts 3 seconds", "a 2-second pause", "10 seconds later" would put a step
# at 0:03, 0:02, 0:10. The word before the number (past hedges like "about") tells, else the words after.
_WORD_BEFORE = re.compile(rf"([^\W\d_]+)\s*{_HEDGE}$", re.IGNORECASE)
_LENGTH_WORDS = frozenset(
    "for last lasts lasting lasted every each span spans spanning spanned take takes took taking another "
    "a an of within per".split())
_MOMENT_WORDS = frozenset("at from after before until till to by since near into starting starts begins".split())
_LENGTH_AFTER = re.compile(
    r"\s*(?:long|later|earlier|apart|ago|each|apiece|in\s+(?:length|duration|total)"
    r"|of\s+(?!the\b|this\b|that\b|its?\b)[a-z]"
    r"|(?:pause|gap|silence|delay|break|interval|clip|segment|loop|window|excerpt|snippet|stretch|burst|lull"
    r"|chunk|period)s?\b)",
    re.IGNORECASE,
)
# A sentence ends at .!? before whitespace (so never inside "10.7"), at CJK 。！？, or at a newline.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s)|[。！？]+(?=[^。！？])|\n")  # a run ends once past it


def _seconds(text: str) -> float:
    """Seconds named by one time point: a clock, or numbers each with its unit ("1h02m03s")."""
    if ":" in text:
        total = 0.0
        for part in text.split(":"):
            total = total * 60.0 + float(part.replace(",", "."))
        return total
    return sum(float(number.replace(",", ".")) * _scale(unit) for number, unit in _AMOUNT.findall(text))


def _scale(unit: str) -> float:
    unit = unit.lower()
    return 3600.0 if unit.startswith(("h", "小")) else 60.0 if unit.startswith(("m", "分")) else 1.0


def _segment_seconds(text: str) -> float:
    """Segment-ASR stamp "m.sss" (minutes, then ss.s); plain seconds when that cannot be."""
    minutes, _, frac = text.replace(",", ".").partition(".")
    if len(frac) >= 2:
        secs = float(frac[:2] + "." + (frac[2:] or "0"))
        if secs < 60.0:
            return int(minutes) * 60.0 + secs
    return float(text.replace(",", "."))


def _is_length(match: re.Match[str]) -> bool:
    """Whether a mention with a unit names a length, not a moment (clocks and stamps never do)."""
    if not (match["shared_a"] or match["range_a"] or match["point"]) or ":" in match[0]:
        return False
    before = _WORD_BEFORE.search(match.string, max(0, match.start() - 40), match.start())
    word = before[1].lower() if before else ""
    if word in _LENGTH_WORDS or word in _MOMENT_WORDS:
        return word in _LENGTH_WORDS
    return bool(_LENGTH_AFTER.match(match.string, match.end()))


def _mention(match: re.Match[str], clip: float | None) -> tuple[float, float | None] | None:
    """(start, end) of one matched mention, before ordering and clamping; None if it is no moment."""
    if _is_length(match):
        return None
    if match["seg_a"]:
        end = match["seg_b"]
        return _segment_seconds(match["seg_a"]), _segment_seconds(end) if end else None
    if match["head"]:  # "the first 10 seconds"
        return 0.0, _seconds(match["head"])
    if match["tail"]:  # "the last 10 seconds": of a clip of known length only
        return None if clip is None else (max(0.0, float(clip) - _seconds(match["tail"])), float(clip))
    if match["shared_a"]:
        scale = _scale(match["shared_u"])
        return _seconds(match["shared_a"]) * scale, _seconds(match["shared_b"]) * scale
    for first, last in (("lyric_a", "lyric_b"), ("range_a", "range_b")):
        if match[first]:
            return _seconds(match[first]), _seconds(match[last])
    return _seconds(match["point"]), None


def _mentions(text: str, clip: float | None) -> Iterator[tuple[re.Match[str], tuple[float, float | None]]]:
    for match in _TIMES.finditer(text):
        if (times := _mention(match, clip)) is not None:
            yield match, times


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
    return [_clamp(*times, clip_duration_s) for _, times in _mentions(text, clip_duration_s)]


def _in_whole(
    start: float, end: float | None, offset_s: float, duration_s: float | None
) -> tuple[float, float | None]:
    """A part's time in the whole recording. The part's question names the part's place in the
    whole ("it runs from 25:00 to 50:00"), so the model may answer in the whole's times: a time past
    the part's own length but not before its place in the whole can only be one, and is kept. Parts
    are about equally long, so the two readings overlap only near the second part's start; there the
    part's own time (how the model hears its clip: time restarts at 0) is taken."""
    if duration_s is not None and start > duration_s and start >= offset_s:
        start, end = start - offset_s, None if end is None else end - offset_s
    start, end = _clamp(start, end, duration_s)
    return start + offset_s, None if end is None else end + offset_s


def shift_times(text: str, offset_s: float, clip_duration_s: float | None = None) -> str:
    """`text` with each time mention rewritten as a clock time `offset_s` seconds later: a part's
    answer made to speak of the whole recording ("from 1:10 to 1:25" in a part that starts at 25:00
    becomes "from 26:10–26:25"). Times are clamped to the part first, as steps are; a time already
    in the whole recording stays (see `_in_whole`); lengths ("10 seconds long") are left alone."""
    def absolute(match: re.Match[str]) -> str:
        times = _mention(match, clip_duration_s)
        if times is None:
            return match[0]
        start, end = _in_whole(*times, offset_s, clip_duration_s)
        tenths = re.search(r"\d[.,]\d", match[0]) is not None  # "10.7s" stays as precise: 25:10.7
        return _stamp(start, tenths) if end is None else f"{_stamp(start, tenths)}–{_stamp(end, tenths)}"

    return _TIMES.sub(absolute, text)


def _stamp(seconds: float, tenths: bool) -> str:
    """`clock(seconds)`, with the tenth of a second after it when asked and not zero ("25:10.7")."""
    if not tenths:
        return clock(seconds)
    whole, tenth = divmod(round(max(seconds, 0.0) * 10), 10)
    return clock(whole) + (f".{tenth}" if tenth else "")


def shift_step(step: ThinkStep, offset_s: float, clip_duration_s: float | None = None) -> ThinkStep:
    """A part's `step` (times in the part, clamped to it) in the whole recording: its times and its
    sentence's, read again from the sentence so that a time already in the whole is kept. The step's
    own mention is the one that reads as its times (a sentence may name several)."""
    def apart(times: tuple[float, float | None]) -> float:  # from the step's times, read as it was read
        start, end = _clamp(*times, clip_duration_s)
        return abs(start - step.start) + abs((start if end is None else end) - (step.start if step.end is None else step.end))
    # the nearest, not an equal one: the part's length here may differ from its clip's in the last digits
    own = min((times for _, times in _mentions(step.text, clip_duration_s)), key=apart, default=None)
    if own is None:  # cannot be: a step's sentence names its time
        start, end = step.start + offset_s, None if step.end is None else step.end + offset_s
    else:
        start, end = _in_whole(*own, offset_s, clip_duration_s)
    return replace(step, start=start, end=end, text=shift_times(step.text, offset_s, clip_duration_s))


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
