"""Streaming endpointer: PCM chunks of any size and rate in, `SpeechStarted` / `UtteranceEnded` out.

Speech probability comes from Silero VAD on onnxruntime (afnext/vad_backends.py), in 32 ms frames on
one fixed grid of the 16 kHz stream. webrtcvad must also hear speech near each onset (a second opinion
against false starts) and is the whole detector when onnxruntime is missing. Every decision is made
per frame at a sample position, so the events do not depend on how the input is chunked.

When a turn ends: after `hangover_ms` of silence, or — with `semantic` — as soon as the speaker sounds
finished. Then Smart Turn (afnext/turn.py) is asked, on the turn so far, at each of `ask_at_ms` into a
pause (192 and 288 ms): "complete" ends the turn there; otherwise it waits for more speech, up to
`max_silence_ms`. A thinking pause mid-sentence thus stays inside the turn, and a finished sentence
ends a third of a second after its last word instead of after the whole hangover. Each ask costs
the model's own time (~30-40 ms on one core) on the thread that pushes audio, twice per pause at
most; the capture itself (a sound card callback, a socket) only queues audio and never waits on it.

    python -m afnext.vad recording.wav --json [--backend auto|silero|webrtc] [--hangover-ms 800]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import numbers
import sys
import time
from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE, AudioError, MonoResampler
from .media import stream_audio
from .turn import WINDOW_S
from .vad_backends import (BACKENDS, SILERO_CONTEXT_SAMPLES, SILERO_FRAME_SAMPLES, SILERO_STATE_SHAPE,
                           WEBRTC_FRAME_SAMPLES, choose_backend, load_webrtcvad, silero_model)

GATE_LEAD_MS = 100  # ms before a Silero onset in which webrtcvad's speech also counts
GATE_MIN_MS = 90  # ms of webrtcvad speech (three frames) the onset needs to open the gate
ONSET_GAP_MS = 200  # ms of non-speech that drop an onset not yet confirmed by min_speech_ms
# Silero's frames turn speech up to ~110 ms late and stay speech up to ~120 ms after the voice stops
# (webrtcvad's ~110 ms), too coarse for a hangover of 600 ± 40 ms. Where the speech stands clearly
# above the background, the edges are moved to where the signal level rises and falls.
EDGE_BLOCK_SAMPLES = 128  # 8 ms blocks in which the signal level is measured
ONSET_SEARCH_MS = 160  # ms before the first speech frame searched for the rising edge
END_SEARCH_MS = 192  # ms before the end of the last speech frame searched for the falling edge
EDGE_CONTRAST_DB = 20.0  # the loudest block must be this far above the quietest to trust levels
EDGE_FLOOR_DB = 10.0  # a block is voice when this far above the quietest block ...
EDGE_RANGE_DB = 40.0  # ... and no more than this far under the loudest
# ms of audio after UtteranceEnded.end handed over with the utterance, at most (never past the decision):
# the whole pause before the decision, so a soft ending or a syllable after a stop closure ("Cen-ter"),
# which the detectors may call non-speech, is in the audio the model hears.
TAIL_MS = 600
_PER_MS = SAMPLE_RATE // 1000  # 16 kHz samples per millisecond


@dataclass(frozen=True)
class SpeechStarted:
    t: float  # seconds on the input timeline where speech began (the onset, not the confirmation)


@dataclass(frozen=True)
class UtteranceEnded:
    t: float  # seconds on the input timeline when the end of the turn was decided
    start: float  # seconds: speech onset
    end: float  # seconds: where the last speech stopped (t - end ≈ hangover, or the pause Smart Turn heard)
    # float32 mono 16 kHz, from pre-roll before `start` to TAIL_MS after `end` (at most up to `t`);
    # left out of == and repr
    audio: np.ndarray = dataclasses.field(repr=False, compare=False)
    complete: float | None = None  # Smart Turn's probability that ended the turn (None: silence ended it)
    forced: bool = False  # ended by `max_utterance_s` while the voice went on (no pause ended it)


Event = SpeechStarted | UtteranceEnded


@dataclass(frozen=True)
class EndpointerOptions:
    pre_roll_ms: int = 300  # ms of audio before the onset included in UtteranceEnded.audio
    min_speech_ms: int = 250  # ms of speech before a turn starts: shorter coughs and clicks never do
    hangover_ms: int = 600  # ms of non-speech after the last speech frame that end the turn
    enter: float = 0.5  # speech probability at or above which a frame turns speech
    leave: float = 0.35  # probability under which speech frames turn non-speech again (hysteresis)
    max_utterance_s: float = 30.0  # seconds from the onset after which a turn is ended by force
    webrtc_gate: bool = True  # Silero backend: an onset must also be speech to webrtcvad
    webrtc_mode: int = 2  # webrtcvad aggressiveness, 0 (least) to 3 (most eager to say non-speech)
    # Semantic end of turn (Smart Turn): asked at these ms into a pause; "complete" (>= `complete`)
    # ends the turn there, else it ends after `max_silence_ms`. Without the model: `hangover_ms`.
    semantic: bool = False
    ask_at_ms: tuple[int, ...] = (192, 288)
    complete: float = 0.5
    max_silence_ms: int = 2000


class Endpointer:
    """One audio stream's endpointer; not thread-safe (one stream, one caller).

    `backend`: "silero" (raises RuntimeError when onnxruntime or the silero-vad wheel is missing),
    "webrtc", or "auto": silero when it can run, else webrtc with a logged warning.
    """

    def __init__(self, options: EndpointerOptions = EndpointerOptions(), *, backend: str = "auto",
                 turn_model=None) -> None:
        _check_options(options)
        self.options = options
        # Smart Turn when semantic (`turn_model`, or the installed one); None: silence ends turns. The
        # fallback is logged once per process by load_turn_model.
        self.turn_model = None
        if options.semantic:
            from .turn import load_turn_model

            self.turn_model = turn_model if turn_model is not None else load_turn_model()
        self.backend = choose_backend(backend)  # "silero" or "webrtc": the one in use
        self._model = silero_model() if self.backend == "silero" else None
        self._use_webrtc = self.backend == "webrtc" or options.webrtc_gate
        if self._use_webrtc:
            load_webrtcvad()  # a missing module fails here, not on the first chunk
        self._pre_roll = options.pre_roll_ms * _PER_MS  # the limits below, in 16 kHz samples
        self._min_speech = options.min_speech_ms * _PER_MS
        self._hangover = options.hangover_ms * _PER_MS
        self._max_silence = options.max_silence_ms * _PER_MS
        self._asks = sorted(ms * _PER_MS for ms in options.ask_at_ms)
        self._max_utterance = round(options.max_utterance_s * SAMPLE_RATE)
        self._frame = SILERO_FRAME_SAMPLES if self._model is not None else WEBRTC_FRAME_SAMPLES
        self.reset()

    @property
    def speaking(self) -> bool:
        """Inside confirmed speech: after SpeechStarted, before its UtteranceEnded (for barge-in)."""
        return self._phase == "speech"

    def reset(self) -> None:
        """Forget the stream: the next push starts a new timeline at 0 s."""
        self._resampler: MonoResampler | None = None
        self._samples = _Samples()
        self._vad = load_webrtcvad().Vad(self.options.webrtc_mode) if self._use_webrtc else None
        self._webrtc_next = 0  # sample where the next webrtcvad frame starts
        self._webrtc_speech: collections.deque[int] = collections.deque()  # ends of its speech frames
        self._state = np.zeros(SILERO_STATE_SHAPE, np.float32)  # Silero's LSTM state
        self._next = 0  # sample where the next detector frame starts
        self._active = False  # the last frame was speech (after hysteresis)
        self._phase = "silence"  # silence | onset (speech seen, not confirmed) | speech
        self._onset = 0  # sample: where the voice of the current onset or turn began
        self._voiced = 0  # samples of speech frames since the onset
        self._last_voice = 0  # sample: end of the last speech frame
        self._voice_end = 0  # sample: where the voice stopped, refined from `_last_voice`
        self._handed_out = 0  # sample: audio before this went out in an UtteranceEnded already
        self._asked = 0  # Smart Turn asks made in the current pause

    def discard(self) -> None:
        """Forget speech in progress without ending a turn (push-to-talk took over); the timeline
        goes on, and audio already pushed will not reach a later utterance."""
        self._phase, self._voiced = "silence", 0
        self._handed_out = max(self._handed_out, self._next)

    def push(self, pcm: np.ndarray, sample_rate: int) -> list[Event]:
        """Feed the next chunk: int16 or float PCM, [n] or [n, channels], at any rate.

        Returns the events the chunk completes, in time order. Detection runs on whole 32 ms frames
        (30 ms for webrtc), so a chunk shorter than a frame may return nothing until the next one.
        Raises AudioError for a rate <= 0 or a shape other than [n] / [n, channels].
        """
        if self._resampler is None or self._resampler.sample_rate != sample_rate:
            resampler = MonoResampler(sample_rate)  # refuses a rate <= 0; push refuses a bad shape
            if self._resampler is not None:  # the source changed rate: drain the old filter
                self._samples.append(self._resampler.flush())
            self._resampler = resampler
        self._samples.append(self._resampler.push(pcm))
        return self._advance()

    def flush(self) -> list[Event]:
        """End of input: decide what is left; an utterance in progress ends at the input's end.

        Resets the endpointer afterwards, so it can take a new stream.
        """
        if self._resampler is not None:
            self._samples.append(self._resampler.flush())
        events = self._advance()
        if self._phase == "speech":
            end_of_input = self._samples.end
            events.append(self._utterance_ended(end_of_input, min(self._voice_end, end_of_input)))
        self.reset()
        return events

    def _advance(self) -> list[Event]:
        """Run the detectors over every whole frame now buffered; the state machine per frame."""
        if self._vad is not None:
            self._run_webrtc()
        n_frames = (self._samples.end - self._next) // self._frame
        if n_frames <= 0:
            return []
        starts = self._next + self._frame * np.arange(n_frames)
        probabilities = self._silero(n_frames) if self._model is not None else self._webrtc_probabilities(starts)
        events = []
        for start, probability in zip(starts.tolist(), probabilities.tolist()):
            event = self._step(start, start + self._frame, probability)
            if event is not None:
                events.append(event)
        self._next += n_frames * self._frame
        self._forget()
        return events

    def _step(self, start: int, end: int, probability: float) -> Event | None:
        """One frame [start, end) of the state machine silence → onset → speech → silence."""
        was_active = self._active
        self._active = probability >= (self.options.leave if was_active else self.options.enter)
        if self._active:
            if self._phase == "silence":
                self._phase, self._onset, self._voiced = "onset", self._rising_edge(start, end), 0
            self._voiced += end - start
            self._last_voice = self._voice_end = end
            self._asked = 0  # speech again: a new pause will be asked about afresh
        elif was_active and self._phase != "silence":
            self._voice_end = self._falling_edge(end)
        if self._phase == "onset":
            if not self._active and end - self._last_voice >= ONSET_GAP_MS * _PER_MS:
                self._phase = "silence"  # a click or a cough: it never started a turn
            elif self._voiced >= self._min_speech and self._gate_open(end):
                self._phase = "speech"
                return SpeechStarted(self._onset / SAMPLE_RATE)
        elif self._phase == "speech":
            if self.turn_model is not None and not self._active:
                ended = self._ask(end)
                if ended is not None:
                    return ended
            # Decided at the frame end nearest to voice end + hangover: on average exactly hangover.
            hangover = self._hangover if self.turn_model is None else self._max_silence
            quiet = not self._active and end - self._voice_end >= hangover - self._frame // 2
            if quiet:
                return self._utterance_ended(end, self._voice_end)
            if end - self._onset >= self._max_utterance:
                return dataclasses.replace(self._utterance_ended(end, self._voice_end), forced=True)
        return None

    def _ask(self, end: int) -> UtteranceEnded | None:
        """In a pause: at the next ask point, whether Smart Turn hears a finished turn in [onset, end)."""
        if self._asked >= len(self._asks) or end - self._voice_end < self._asks[self._asked] - self._frame // 2:
            return None
        self._asked += 1
        # The model hears the turn's last WINDOW_S seconds: no need to copy more of a long one.
        first = max(self._onset - self._pre_roll, self._handed_out, 0, end - WINDOW_S * SAMPLE_RATE)
        probability = self.turn_model.complete(self._samples.copy(first, end))
        if probability < self.options.complete:
            return None
        return dataclasses.replace(self._utterance_ended(end, self._voice_end), complete=probability)

    def _rising_edge(self, start: int, end: int) -> int:
        """Where the voice of a first speech frame [start, end) began; `start` when unclear."""
        first = max(start - ONSET_SEARCH_MS * _PER_MS, self._handed_out, 0)
        span = _loud_span(self._samples.copy(first, end))
        return first + span[0] if span else start

    def _falling_edge(self, end: int) -> int:
        """Where the voice stopped, seen from the first non-speech frame, which ends at `end`."""
        first = max(self._last_voice - END_SEARCH_MS * _PER_MS, self._onset)
        span = _loud_span(self._samples.copy(first, end))
        return max(first + span[1], self._onset + 1) if span else self._last_voice

    def _gate_open(self, now: int) -> bool:
        """webrtcvad saw enough speech from GATE_LEAD_MS before the onset until `now` (its frames
        ending after `now` are ignored: which of them exist yet depends on the chunking)."""
        if self._model is None or self._vad is None:
            return True
        since = self._onset - GATE_LEAD_MS * _PER_MS
        n_speech = sum(since < end <= now for end in self._webrtc_speech)
        return n_speech * WEBRTC_FRAME_SAMPLES >= GATE_MIN_MS * _PER_MS

    def _utterance_ended(self, decided: int, last_voice: int) -> UtteranceEnded:
        first = max(self._onset - self._pre_roll, self._handed_out, 0)
        last = min(last_voice + TAIL_MS * _PER_MS, decided)
        end = self._soft_end(last_voice, last)
        self._phase, self._handed_out = "silence", last
        return UtteranceEnded(
            t=decided / SAMPLE_RATE, start=self._onset / SAMPLE_RATE, end=end / SAMPLE_RATE,
            audio=self._samples.copy(first, last),
        )

    def _soft_end(self, last_voice: int, last: int) -> int:
        """Where the voice really stopped: `last_voice`, or later where a soft ending or a syllable after
        a stop closure, which the detectors called non-speech, still stands above the pause's level."""
        first = max(last_voice - END_SEARCH_MS * _PER_MS, self._onset)
        if last - first < 2 * EDGE_BLOCK_SAMPLES:
            return last_voice
        span = _loud_span(self._samples.copy(first, last))
        return max(last_voice, min(first + span[1], last)) if span else last_voice

    def _silero(self, n_frames: int) -> np.ndarray:
        """Speech probabilities of the next `n_frames` frames, each with its 64 samples of context."""
        first = self._next - SILERO_CONTEXT_SAMPLES
        flat = self._samples.copy(first, self._next + n_frames * SILERO_FRAME_SAMPLES)
        # Row i is flat[512 i : 512 i + 576]: the frame and the context before it, as strides.
        frames = np.lib.stride_tricks.as_strided(
            flat, (n_frames, SILERO_CONTEXT_SAMPLES + SILERO_FRAME_SAMPLES), (SILERO_FRAME_SAMPLES * 4, 4)
        )
        probabilities, self._state = self._model.run(frames, self._state)
        return probabilities

    def _run_webrtc(self) -> None:
        """webrtcvad over every whole 30 ms frame buffered; it keeps its own noise estimate."""
        n_frames = (self._samples.end - self._webrtc_next) // WEBRTC_FRAME_SAMPLES
        if n_frames <= 0:
            return
        end = self._webrtc_next + n_frames * WEBRTC_FRAME_SAMPLES
        pcm = (np.clip(self._samples.copy(self._webrtc_next, end), -1.0, 1.0) * 32767).astype(np.int16)
        for i in range(n_frames):
            frame = pcm[i * WEBRTC_FRAME_SAMPLES : (i + 1) * WEBRTC_FRAME_SAMPLES]
            if self._vad.is_speech(frame.tobytes(), SAMPLE_RATE):
                self._webrtc_speech.append(self._webrtc_next + (i + 1) * WEBRTC_FRAME_SAMPLES)
        self._webrtc_next = end

    def _webrtc_probabilities(self, starts: np.ndarray) -> np.ndarray:
        """The webrtc backend: 1.0 for the frames webrtcvad called speech, else 0.0."""
        speech_ends = set(self._webrtc_speech)
        return np.array([float(start + WEBRTC_FRAME_SAMPLES in speech_ends) for start in starts.tolist()])

    def _forget(self) -> None:
        """Drop samples and webrtcvad frames nothing can ask for any more."""
        # A future onset can be refined back by ONSET_SEARCH_MS before its frame, then pre-rolled.
        if self._phase == "silence":
            onset = self._next - ONSET_SEARCH_MS * _PER_MS
        else:
            onset = self._onset
        keep = max(onset - self._pre_roll, self._handed_out)
        keep = min(keep, self._next - SILERO_CONTEXT_SAMPLES)
        self._samples.drop_before(min(keep, self._webrtc_next) if self._vad is not None else keep)
        lead = max(GATE_LEAD_MS * _PER_MS, WEBRTC_FRAME_SAMPLES)
        while self._webrtc_speech and self._webrtc_speech[0] <= onset - lead:
            self._webrtc_speech.popleft()


def _loud_span(samples: np.ndarray) -> tuple[int, int] | None:
    """[first, last) bounds of the voice in `samples`, on an 8 ms grid: from the first to the end
    of the last block well above the quietest one; None when the level range is too small to
    tell voice from background (noisy input), so callers keep the detector's own frame edge."""
    n_blocks = samples.size // EDGE_BLOCK_SAMPLES
    if n_blocks < 2:
        return None
    blocks = samples[: n_blocks * EDGE_BLOCK_SAMPLES].reshape(n_blocks, EDGE_BLOCK_SAMPLES)
    level_db = 10 * np.log10(np.einsum("ij,ij->i", blocks, blocks) / EDGE_BLOCK_SAMPLES + 1e-10)
    quietest, loudest = level_db.min(), level_db.max()
    if loudest - quietest < EDGE_CONTRAST_DB:
        return None
    voiced = np.flatnonzero(level_db >= max(quietest + EDGE_FLOOR_DB, loudest - EDGE_RANGE_DB))
    return int(voiced[0]) * EDGE_BLOCK_SAMPLES, (int(voiced[-1]) + 1) * EDGE_BLOCK_SAMPLES


class _Samples:
    """The recent part of the 16 kHz stream, addressed by absolute sample position; appending is
    amortised O(chunk), so one-sample chunks do not copy the buffer each time."""

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE, np.float32)
        self._head = 0  # index in _data of sample `start`
        self.start = 0  # absolute position of the oldest sample kept
        self.end = 0  # absolute position one past the newest sample

    def append(self, samples: np.ndarray) -> None:
        kept = self.end - self.start
        if self._head + kept + samples.size > self._data.size:
            grown = np.zeros(max(self._data.size, 2 * (kept + samples.size)), np.float32)
            grown[:kept] = self._data[self._head : self._head + kept]
            self._data, self._head = grown, 0
        self._data[self._head + kept : self._head + kept + samples.size] = samples
        self.end += samples.size

    def copy(self, first: int, last: int) -> np.ndarray:
        """Samples [first, last) as a new array; positions before 0 (the stream start) are zeros."""
        assert max(first, 0) >= self.start and last <= self.end, (first, last, self.start, self.end)
        out = np.zeros(last - first, np.float32)
        lead = max(0, -first)
        out[lead:] = self._data[self._head + first + lead - self.start : self._head + last - self.start]
        return out

    def drop_before(self, position: int) -> None:
        position = min(max(position, self.start), self.end)
        self._head += position - self.start
        self.start = position


def _check_options(options: EndpointerOptions) -> None:
    """ValueError naming the field for options the state machine cannot run with (the CLI takes
    any number, "inf" and "nan" included)."""
    for name in ("pre_roll_ms", "min_speech_ms", "hangover_ms", "max_silence_ms"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be a whole number of ms, 0 or more; got {value!r}.")
    asks = options.ask_at_ms
    if not isinstance(asks, tuple) or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool)
                                              and 0 < a <= options.max_silence_ms for a in asks):
        raise ValueError(f"ask_at_ms must be a tuple of whole ms in (0, max_silence_ms]; got {asks!r}.")
    if not 0 <= options.complete <= 1:
        raise ValueError(f"complete must be a probability from 0 to 1; got {options.complete!r}.")
    seconds = options.max_utterance_s
    if not 0 < seconds < float("inf"):  # NaN fails the comparison too
        raise ValueError(f"max_utterance_s must be a finite number of seconds above 0; got {seconds!r}.")
    if options.webrtc_mode not in (0, 1, 2, 3):
        raise ValueError(f"webrtc_mode must be 0, 1, 2 or 3; got {options.webrtc_mode!r}.")
    if not 0 <= options.leave <= options.enter <= 1:
        raise ValueError(f"need 0 <= leave <= enter <= 1, got leave={options.leave}, enter={options.enter}")


MAX_FILE_S = 4 * 3600.0  # seconds: the CLI takes what a conversation takes (split.MAX_RECORDING_S), decoded in blocks


def main(argv: list[str] | None = None) -> int:
    """CLI: the speech segments of one file, and how fast they were found."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fields = {field.name: getattr(args, field.name) for field in dataclasses.fields(EndpointerOptions)}
    fields = {name: tuple(value) if isinstance(value, list) else value for name, value in fields.items()}
    try:
        endpointer = Endpointer(EndpointerOptions(**fields), backend=args.backend)
    except (ValueError, RuntimeError) as error:  # options out of range, a backend that cannot run
        parser.error(str(error))
    segments, seconds, elapsed = [], 0.0, 0.0

    def heard(events: list) -> None:  # the times only: a turn's own audio is let go at once
        segments.extend({"start": round(e.start, 3), "end": round(e.end, 3)} for e in events if isinstance(e, UtteranceEnded))

    try:  # block by block: a 4-hour recording is never in memory whole (no model here, so no 30-min limit)
        _, blocks = stream_audio(args.file, max_seconds=MAX_FILE_S)
        for block in blocks:
            began = time.perf_counter()
            events = endpointer.push(block, SAMPLE_RATE)
            elapsed += time.perf_counter() - began
            seconds += block.size / SAMPLE_RATE
            heard(events)
    except AudioError as error:
        print(error, file=sys.stderr)
        return 1
    began = time.perf_counter()
    events = endpointer.flush()
    elapsed += time.perf_counter() - began
    heard(events)
    realtime = seconds / max(elapsed, 1e-9)  # audio seconds per second of work
    if args.json:
        report = {"segments": segments, "realtime_factor": round(realtime, 1), "backend": endpointer.backend}
        print(json.dumps(report))
    else:
        for segment in segments:
            print(f"{segment['start']:9.3f} {segment['end']:9.3f}")
        turns = f"{len(segments)} turn" + ("" if len(segments) == 1 else "s")
        print(f"{turns}, {endpointer.backend} backend, {realtime:.0f}x real time", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m afnext.vad", description="Print the speech turns of a recording.")
    parser.add_argument("file", help="audio file (wav, flac, mp3, ogg, webm, m4a)")
    parser.add_argument("--json", action="store_true", help='print {"segments", "realtime_factor", "backend"} instead')
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    for field in dataclasses.fields(EndpointerOptions):  # one flag per option: --hangover-ms 800
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif isinstance(field.default, tuple):  # --ask-at-ms 150 300: a list here, a tuple in main
            parser.add_argument(flag, type=type(field.default[0]), nargs="+", default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    return parser


if __name__ == "__main__":
    from .cli import run

    sys.exit(run(main))
