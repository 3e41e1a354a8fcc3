"""Time mentions in the model's text: "10.7s to 16.9s", "1:30", "the first 10 seconds" → seconds.

`find_times` reads every moment or range a text names, in order, as (start_s, end_s or None); Think
steps are made of them (think.py). Times recognised, in seconds: "10.7s to 16.9s", "3.2 s - 5 s",
"between 4 and 6 seconds", "the 30-second mark", "1:30", "1:02:03", "12 sec", "12,5 s" (decimal
comma), "1 min 30 s", "2 minutes", "1h02m03s", "1.5 hours", "0:12 -> 0:15", subtitle cues
"00:01:02,500 --> 00:01:04,000", "12秒到15秒", "1分30秒", "the first 10 seconds" (0-10 s), "the last
10 seconds" (with a clip duration), lyric ranges "[11.0 - 14.0]" and segment ASR
``<t>0.574-1.034</t>`` (minutes.seconds with tenths: 1.034 is 63.4 s). Not times: bare numbers
("3 speakers", "75.0"), times of day ("3:30 pm"), impossible clocks ("0:75"), and lengths ("lasts
3 seconds", "a 2-second pause", "10 seconds later"): a step there would play from the wrong second.
A range whose end is before its start keeps only its start. With a clip duration, times are
clamped into it; a mention starting past the end becomes the end, as a single moment.

A recording over 30 minutes is heard in parts (parts.py): `shift_times` and `shift_step` move a
part's times into the whole recording's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace

from afnext.events import ThinkStep, clock

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
