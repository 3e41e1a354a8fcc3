"""Which frames the encoder runs, and how windows of many turns share its calls (no model needed;
that the outputs equal the stock encoder's is tested in test_session)."""

from __future__ import annotations

from types import SimpleNamespace

from afnext import encoder


def clip(*frames: int):
    return SimpleNamespace(frames=frames)


def test_a_window_runs_its_valid_frames_and_what_the_convolutions_reach_rounded_to_the_step():
    assert encoder.run_frames(500) == 600  # a 5 s voice turn: 6 s run, not 30
    assert encoder.run_frames(198) == 200 and encoder.run_frames(199) == 400  # the 2 frames past the end count
    assert encoder.run_frames(2998) == encoder.run_frames(3000) == 3000  # never more than a window


def test_windows_of_one_run_length_share_calls_and_a_full_window_never_pads_a_short_one():
    long, voice, other = clip(3000, 3000, 700), clip(480), clip(520)
    items = [(long, 0), (long, 1), (long, 2), (voice, 0), (other, 0)]
    calls = encoder.batches(items, max_frames=6000)
    assert calls == [[(long, 0), (long, 1)], [(long, 2)], [(voice, 0), (other, 0)]]
    assert encoder.batches(items, max_frames=1) == [[item] for item in items], "one window a call at least"


def test_what_rides_along_with_a_window_stays_with_it():
    voice = clip(480, 480)
    calls = encoder.batches([(voice, 1, "b"), (voice, 0, "a")])
    assert calls == [[(voice, 1, "b"), (voice, 0, "a")]]
