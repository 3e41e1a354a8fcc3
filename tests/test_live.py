"""afnext.live: the registry of live conversations lets go of the least recently used within its limits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soundfile

from afnext.live import Live


@dataclass
class _Held:
    held_bytes: int
    closed: bool = False

    def close(self) -> None:
        self.closed = True


def test_memory_over_the_limit_lets_go_of_the_least_recently_used_and_says_why():
    live: Live[_Held] = Live(per_group=10, most=10, max_bytes=250)
    a, b, c = _Held(100), _Held(100), _Held(100)
    live.put("a", "o", "g1", a)
    live.put("b", "o", "g2", b)
    assert live.get("a", "o") is a  # used: now b is the least recently used
    live.put("c", "o", "g3", c)
    assert b.closed and not a.closed and not c.closed and len(live) == 2
    assert live.why_gone("b") == "the server needed its memory"


def test_a_recording_counts_its_samples_not_only_its_caches(tmp_path):
    """A 30-minute upload can be a few MB of compressed audio and 115 MB of samples once decoded: the
    registry's memory limit counts what a recording holds, before anyone has asked about it."""
    from app.recordings import open_recording

    path = tmp_path / "quiet.flac"  # 60 s of silence: a few kB as FLAC, 3.8 MB of samples
    soundfile.write(path, np.zeros(60 * 16000, np.float32), 16000, subtype="PCM_16")
    recordings = [open_recording(str(path), tmp_path) for _ in range(3)]
    assert path.stat().st_size < 100_000 and recordings[0].held_bytes == 60 * 16000 * 4
    closed = []
    live = Live(per_group=10, most=10, max_bytes=2 * 60 * 16000 * 4, on_release=lambda: closed.append(1))
    for i, recording in enumerate(recordings):
        live.put(str(i), "o", f"g{i}", recording)
    assert len(live) == 2 and live.why_gone("0") == "the server needed its memory" and closed
