"""Tests for afnext.think and afnext.times: reasoning/answer split, time mentions, and streamed equals whole."""

from __future__ import annotations

import random
import time

import pytest

from afnext.events import ReasoningDelta, TextDelta, ThinkStep, clock
from afnext.think import ThinkParser, split_think
from afnext.times import find_times

# Realistic outputs: (text, parser options). Together they cover an opening tag, a pre-filled
# one, no tags, CRLF, unicode, segment ASR, lyric ranges and a stray closing tag.
OUTPUTS: list[tuple[str, dict]] = [
    (
        "<think>\nThe speaker greets at roughly 0.5s to 1.2s. Around the 30-second mark a dog "
        "barks! From 1:00 to 1:30 music plays; the tempo is 120 bpm.\nSo the dog is option B."
        "\n</think>\n\nThe answer is B: a dog barks.",
        {},
    ),
    (
        "\n  <think>Lyrics: [11.0 - 14.0] «je t’aime» 🎵 then [14.0 - 17.5] a chorus.\n"
        "No stamps here, 3 speakers in 2024.</think>  Two lines of lyrics.",
        {"clip_duration_s": 16.0},
    ),
    (
        "The speaker greets at roughly 10.7s to 16.9s. Between 4 and 6 seconds?\n"
        "</think>Then silence.",
        {"started": True},
    ),
    (
        "<t>0.574-1.034</t> Speaker 1: Hello there.\n<t>1.034-1.402</t> Speaker 2: Hi, 75.0 "
        "percent sure.",
        {"steps_from_answer": True},
    ),
    (
        "<think>\r\nAt 0:12 a door slams.\r\nAt 1:02:03 it ends\r\n</think>\r\nAt 2:05 the "
        "café closes.",
        {"steps_from_answer": True, "clip_duration_s": 600.0},
    ),
    ("Plain answer with no tags, 12 sec long.", {}),
    ("<think>Unclosed reasoning from 3.2 s - 5 s and then 1 min 30 s", {}),
    ("  <thinking about it> is not a tag </thi", {}),
]


def _stream(pieces: list[str], **options) -> tuple[str, str, list[ThinkStep], list]:
    """Feed pieces one by one; returns (reasoning, answer, steps, events)."""
    parser = ThinkParser(**options)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.close()
    return parser.reasoning, parser.answer, parser.steps, events


def _split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize(("text", "options"), OUTPUTS)
def test_streamed_equals_whole(text: str, options: dict) -> None:
    whole = _stream([text], **options)[:3]
    assert split_think(text, **options) == whole
    for cut in range(len(text) + 1):
        assert _stream(_split_at(text, [cut]), **options)[:3] == whole, cut
    assert _stream(list(text), **options)[:3] == whole
    rng = random.Random(0)
    for _ in range(20):
        cuts = rng.sample(range(len(text) + 1), k=min(len(text), 6))
        assert _stream(_split_at(text, cuts), **options)[:3] == whole


@pytest.mark.parametrize(("text", "options"), OUTPUTS)
def test_events_add_up_to_the_result(text: str, options: dict) -> None:
    reasoning, answer, steps, events = _stream(list(text), **options)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == reasoning
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == answer
    assert [e for e in events if isinstance(e, ThinkStep)] == steps
    assert "<think>" not in reasoning + answer and "</think>" not in reasoning + answer
    assert reasoning == reasoning.strip() and answer == answer.lstrip()


def test_answer_never_holds_reasoning() -> None:
    for text, options in OUTPUTS:
        reasoning, answer, _ = split_think(text, **options)
        for sentence in filter(None, (s.strip() for s in reasoning.splitlines())):
            assert sentence not in answer


def test_split_with_opening_tag() -> None:
    reasoning, answer, steps = split_think(OUTPUTS[0][0])
    assert reasoning.startswith("The speaker greets") and reasoning.endswith("option B.")
    assert answer == "The answer is B: a dog barks."
    assert [(s.start, s.end) for s in steps] == [(0.5, 1.2), (30.0, None), (60.0, 90.0)]
    assert steps[1].text == "Around the 30-second mark a dog barks!"


def test_prefilled_tag_and_no_tag() -> None:
    text = "I hear a bell at 2 s.\n</think>\nA bell."
    assert split_think(text, started=True)[:2] == ("I hear a bell at 2 s.", "A bell.")
    assert split_think(text) == ("", "I hear a bell at 2 s.\n\nA bell.", [])
    # The engine pre-filled the tag and the model wrote it again: still reasoning.
    assert split_think("<think>x</think>y", started=True)[:2] == ("x", "y")
    assert split_think("Intro <think>x</think>y")[:2] == ("", "Intro <think>xy")


def test_unclosed_reasoning_and_lookalike_tags() -> None:
    reasoning, answer, steps = split_think(OUTPUTS[6][0])
    assert answer == "" and reasoning.startswith("Unclosed")
    assert [(s.start, s.end) for s in steps] == [(3.2, 5.0), (90.0, None)]  # each time the sentence names
    assert split_think(OUTPUTS[7][0])[:2] == ("", "<thinking about it> is not a tag </thi")


def test_emits_early_holding_only_a_possible_tag() -> None:
    parser = ThinkParser()
    assert parser.feed("<thi") == []
    assert parser.feed("nk>Dog at 3 s. Then") == [
        ReasoningDelta("Dog at 3 s. Then"),
        ThinkStep(3.0, None, "Dog at 3 s."),
    ]
    assert parser.feed(" cat</th") == [ReasoningDelta(" cat")]
    assert parser.feed("ink>\n Yes") == [TextDelta("Yes")]
    assert parser.close() == []
    assert parser.reasoning == "Dog at 3 s. Then cat"


def test_segment_asr_steps_from_answer() -> None:
    _, answer, steps = split_think(OUTPUTS[3][0], steps_from_answer=True)
    assert answer.startswith("<t>0.574-1.034</t> Speaker 1")
    assert [(s.start, s.end) for s in steps] == [(57.4, 63.4), (63.4, 100.2)]
    assert steps[0].text == "<t>0.574-1.034</t> Speaker 1: Hello there."
    assert split_think(OUTPUTS[3][0])[2] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("roughly 10.7s to 16.9s", [(10.7, 16.9)]),
        ("from 3.2 s - 5 s", [(3.2, 5.0)]),
        ("between 4 and 6 seconds", [(4.0, 6.0)]),
        ("4-6 s and 7 – 9 seconds", [(4.0, 6.0), (7.0, 9.0)]),
        ("[11.0 - 14.0] la la", [(11.0, 14.0)]),
        ("Around the 30-second mark", [(30.0, None)]),
        ("From 1:00 to 1:30", [(60.0, 90.0)]),
        ("at 2:05 and 1:02:03.", [(125.0, None), (3723.0, None)]),
        (
            "12.5 seconds, 12 sec, 45s, at 3 s",
            [(12.5, None), (12.0, None), (45.0, None), (3.0, None)],
        ),
        ("1 minute 30 seconds", [(90.0, None)]),
        ("1 min 30 s, 1m30s", [(90.0, None), (90.0, None)]),
        ("2 minutes in, between 1 and 2 minutes", [(120.0, None), (60.0, 120.0)]),
        ("<t>0.574-1.034</t> Speaker 1: hi", [(57.4, 63.4)]),
        ("<t>0.754-0.9</t>", [(0.754, 0.9)]),  # 75.4 cannot be seconds: plain seconds
        ("from 9 s to 2 s", [(9.0, None)]),
        ("at 1:30. Then 10.7s", [(90.0, None), (10.7, None)]),
    ],
)
def test_time_styles(text: str, expected: list) -> None:
    found = find_times(text)
    assert len(found) == len(expected)
    for (start, end), (want_start, want_end) in zip(found, expected):
        assert start == pytest.approx(want_start)
        assert end == (None if want_end is None else pytest.approx(want_end))


@pytest.mark.parametrize(
    "text",
    ["3 speakers talk", "recorded in 2024", "75.0 percent", "MMAU 74.2", "music of the 1990s",
     "3 stars, 5 m away, 16:9, version 1.2.3", "at 3 and 5"],
)
def test_non_times_are_ignored(text: str) -> None:
    assert find_times(text) == []


def test_clamping_to_the_clip() -> None:
    assert find_times("5 s to 80 s, at 50 s, at 70 s, 1:30 - 2:00", 60) == [
        (5.0, 60.0), (50.0, None), (60.0, None), (60.0, None),
    ]
    _, _, steps = split_think(OUTPUTS[1][0], clip_duration_s=16.0)
    assert [(s.start, s.end) for s in steps] == [(11.0, 14.0), (14.0, 16.0)]


@pytest.mark.parametrize("seconds, shown", [(0.0, "0:00"), (10.62, "0:10"), (59.99, "0:59"), (600.0, "10:00"),
                                            (3599.9, "59:59"), (3723.4, "1:02:03"), (-0.2, "0:00")])
def test_a_clock_shows_the_second_a_moment_falls_in_as_the_waveform_does(seconds, shown):
    assert clock(seconds) == shown


# Reasoning as models write it beyond the official examples: the streamed-equals-whole and
# events checks above run on these too.
OUTPUTS += [
    ("<think>A tone from 12,5 s to 14,0 s. The clip is 20 seconds long.</think>Two tones.", {}),
    ("<think>在12秒时有狗叫！！然后15秒到18秒有音乐。</think>有狗叫和音乐。", {"clip_duration_s": 30.0}),
    ("<think>First at 1 s.</think>\n<think>On reflection, at 2 s.</think>\nThe answer.", {}),
    ("<think>Bell at 1 s <think>then at 2 s.</think> Done.", {}),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("at 12,5 s and from 3,25 to 4,5 seconds", [(12.5, None), (3.25, 4.5)]),  # decimal commas
        ("00:01:02,500 --> 00:01:04,000", [(62.5, 64.0)]),  # subtitle cues
        ("from 0:12 -> 0:15", [(12.0, 15.0)]),
        ("at 1h02m03s, then 1 hour 2 minutes in, then 1.5 hours", [(3723.0, None), (3720.0, None),
                                                                  (5400.0, None)]),
        ("2 hours and 30 seconds", [(7230.0, None)]),
        ("在12秒时，然后15秒到18秒，1分30秒", [(12.0, None), (15.0, 18.0), (90.0, None)]),
        ("12.5秒钟", [(12.5, None)]),
        ("silent in the first 10 seconds", [(0.0, 10.0)]),
    ],
)
def test_more_time_styles(text: str, expected: list) -> None:
    assert find_times(text) == [(pytest.approx(a), None if b is None else pytest.approx(b)) for a, b in expected]


@pytest.mark.parametrize(
    "text",
    ["he says 'meet me at 3:30 pm'", "the 10:45 a.m. train", "a ratio of 3:2", "at 0:75",
     "1,500 listeners", "5 m away and 1 m tall"],
)
def test_clock_times_of_day_and_impossible_clocks_are_not_times(text: str) -> None:
    assert find_times(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The clip is 10 seconds long.", []),
        ("The beep lasts 3 seconds.", []),
        ("It repeats every 2 s.", []),
        ("A dog barks for about 4 seconds.", []),
        ("The two knocks are 2 s apart.", []),
        ("A second bell, 10 seconds later.", []),
        ("There are 20 seconds of silence.", []),
        ("A 2-second pause occurs around 0:05.", [(5.0, None)]),
        ("After a 3 s gap, speech resumes at 7 s.", [(7.0, None)]),
        ("At 12 seconds silence begins.", [(12.0, None)]),  # "at" names a moment
        ("Around the 30-second mark a dog barks.", [(30.0, None)]),
        ("It pauses for 2-3 seconds at 0:20.", [(20.0, None)]),
    ],
)
def test_durations_are_not_moments(text: str, expected: list) -> None:
    """A user clicking "The beep lasts 3 seconds" would be sent to 0:03, which the sentence never names."""
    assert find_times(text) == expected


def test_the_last_seconds_are_counted_from_the_clips_end() -> None:
    assert find_times("in the last 10 seconds", 60.0) == [(50.0, 60.0)]
    assert find_times("in the final 10 seconds") == []  # no clip: nowhere to put them


def test_a_second_think_block_before_the_answer_is_reasoning_never_spoken() -> None:
    reasoning, answer, steps = split_think(OUTPUTS[-2][0])
    assert reasoning == "First at 1 s.\n\nOn reflection, at 2 s." and answer == "The answer."
    assert [s.start for s in steps] == [1.0, 2.0]
    # Only before the answer begins: a tag later in the answer is text, as at the output's start.
    assert split_think("<think>x</think>Yes <think>y</think>")[:2] == ("x", "Yes <think>y")


def test_a_repeated_opening_tag_inside_reasoning_is_never_shown() -> None:
    reasoning, answer, steps = split_think(OUTPUTS[-1][0])
    assert reasoning == "Bell at 1 s then at 2 s." and answer == "Done."
    assert [(s.start, s.text) for s in steps] == [(1.0, "Bell at 1 s then at 2 s."), (2.0, "Bell at 1 s then at 2 s.")]


def test_chinese_reasoning_is_cut_into_timed_steps() -> None:
    _, _, steps = split_think(OUTPUTS[-3][0], clip_duration_s=30.0)
    assert [(s.start, s.end, s.text) for s in steps] == [
        (12.0, None, "在12秒时有狗叫！！"), (15.0, 18.0, "然后15秒到18秒有音乐。")]


def test_decimal_comma_and_durations_in_a_streamed_reply() -> None:
    _, _, steps = split_think(OUTPUTS[-4][0])
    assert [(s.start, s.end) for s in steps] == [(12.5, 14.0)]


def _feed_seconds(text: str) -> float:
    parser = ThinkParser(started=True)
    t0 = time.perf_counter()
    for char in text:
        parser.feed(char)
    parser.close()
    return time.perf_counter() - t0


@pytest.mark.parametrize("unit", ["word at 3 s ", " "], ids=["one long sentence", "a run of spaces"])
def test_long_reasoning_one_character_a_delta_stays_linear(unit: str) -> None:
    """Reasoning with no sentence end, or a long run of whitespace, fed a character at a time: four
    times the text takes about four times as long (it took 14 times as long, 11 s, when each delta
    rescanned the text held so far)."""
    small, large = (unit * (n // len(unit)) for n in (10_000, 40_000))
    ratio = min(_feed_seconds(large) for _ in range(2)) / min(_feed_seconds(small) for _ in range(2))
    assert ratio < 8


def test_each_time_a_sentence_names_is_a_step_of_its_own():
    """A sentence that names several times gives a step at each (each plays from its own time), in the
    sentence's order; a time named twice is one step."""
    _, _, steps = split_think("<think>The dog barks at 0:12 and again at 0:45, then at 0:12 once more.</think>Two barks.")
    sentence = "The dog barks at 0:12 and again at 0:45, then at 0:12 once more."
    assert [(s.start, s.end, s.text) for s in steps] == [(12.0, None, sentence), (45.0, None, sentence)]


def test_a_parts_steps_are_shifted_by_their_own_times_and_keep_their_tenths():
    from afnext.times import shift_step, shift_times

    _, _, steps = split_think("<think>A bell from 12.5s to 15.5s, a door at 40s.</think>", clip_duration_s=60.0)
    shifted = [shift_step(s, 1500.0, 60.0) for s in steps]
    assert [(s.start, s.end) for s in shifted] == [(1512.5, 1515.5), (1540.0, None)]
    assert {s.text for s in shifted} == {"A bell from 25:12.5–25:15.5, a door at 25:40."}
    assert shift_times("from 10.0s to 11.96s", 60.0, 30.0) == "from 1:10–1:12"  # 11.96 is 12.0 to the tenth
    # A time in the whole recording (25:30, in a part from 25:00) was clamped to the part's clip length,
    # which the part's own length may differ from in the last digits: still read as that mention.
    _, _, (_, door) = split_think("<think>A bell at 5s, a door at 25:30.</think>", clip_duration_s=60.0)
    assert (shift_step(door, 1500.0, 60.000001).start, door.start) == (pytest.approx(1530.0), 60.0)
