"""Sound devices for the desktop loop: PortAudio through sounddevice, and the playback buffer.

The voice loop sees only `AudioPorts` (a microphone and a speaker it can open with a callback), so
tests drive it with fake streams and no PortAudio at all. Both callbacks run on PortAudio's own
thread and never wait on the model: the microphone's copies each block into a queue; the speaker's
takes what `Playback` holds and plays silence for the rest.

`sounddevice` is imported on first use: without Debian's libportaudio2 its import raises OSError,
which becomes a `NoAudioError` that says what to install.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from afnext.audio import SAMPLE_RATE
from afnext.events import AudioChunk
from afnext.tts import SpeechResampler

MIC_BLOCK_S = 0.02  # seconds of audio per microphone callback
MIC_QUEUE_S = 30.0  # seconds of microphone audio held while the feeder is busy (a barge-in waits
#                     for the turn to stop); beyond that new blocks are dropped, never memory grown
MAX_CHANNELS = 2  # devices that refuse mono are opened in stereo: mic channels averaged, speech on both


class NoAudioError(RuntimeError):
    """No usable sound device or library; the message is one sentence saying what to do."""


class Stream(Protocol):
    """A running audio stream (sounddevice's streams are ones)."""

    @property
    def active(self) -> bool: ...  # False once the stream stopped by itself (device unplugged, driver failed)

    def close(self) -> None: ...


def stopped(stream: Stream) -> bool:
    """The stream ended by itself: its device was unplugged or its driver failed. PortAudio then stops
    calling back (the loop would wait for ever, hearing nothing) and reports the stream inactive, or
    fails to answer at all."""
    try:
        return not stream.active
    except Exception:  # sounddevice's PortAudioError: PortAudio cannot tell, so the stream is no use either
        return True


# sounddevice's callback signatures: (indata [frames, channels] float32, frames, time, status) and
# (outdata [frames, channels] float32 to fill, frames, time, status).
MicCallback = Callable[[np.ndarray, int, object, object], None]
SpeakerCallback = Callable[[np.ndarray, int, object, object], None]


@dataclass(frozen=True)
class AudioPorts:
    """A microphone and a speaker, each opened (and started) with a callback on demand."""

    mic_name: str
    mic_rate: int  # Hz of the blocks the microphone callback receives
    speaker_name: str
    speaker_rate: int  # Hz the speaker callback must fill
    open_mic: Callable[[MicCallback], Stream]  # raises NoAudioError when the device fails
    open_speaker: Callable[[SpeakerCallback], Stream]


def load_sounddevice():
    """The `sounddevice` module, or NoAudioError when it or the PortAudio library is missing."""
    try:
        import sounddevice
    except OSError as exc:  # the package is there, the PortAudio library it loads is not
        raise NoAudioError("PortAudio is not installed: install Debian's libportaudio2 "
                           "(`sudo apt-get install libportaudio2`) and run this again.") from exc
    except ImportError as exc:
        raise NoAudioError("The sounddevice package is not installed: run `pip install sounddevice`.") from exc
    return sounddevice


def list_devices(sd) -> str:
    """One line per device PortAudio sees, for --list-devices."""
    devices = list(sd.query_devices())
    if not devices:
        raise NoAudioError("PortAudio finds no sound device: plug in a microphone and a speaker or headphones "
                           "(and check that this user may use the sound devices).")
    default_in, default_out = _defaults(sd)
    lines = ["index  device  (input channels / output channels, default rate)"]
    for d in devices:
        marks = [m for m, on in (("default input", d["index"] == default_in),
                                 ("default output", d["index"] == default_out)) if on]
        lines.append(f"{d['index']:5}  {d['name']}  ({d['max_input_channels']} in / {d['max_output_channels']} out, "
                     f"{d['default_samplerate']:.0f} Hz){'  [' + ', '.join(marks) + ']' if marks else ''}")
    lines.append("Pick one with --input-device / --output-device: its index or part of its name.")
    return "\n".join(lines)


def sounddevice_ports(sd, input_device: str | None = None, output_device: str | None = None) -> AudioPorts:
    """`AudioPorts` on PortAudio devices named by index or name substring (None: the default).

    The microphone runs at 16 kHz when the device takes it, else at its default rate; the speaker
    at its default rate. Raises NoAudioError when a device is missing or refuses every setting.
    """
    mic = pick_device(sd, input_device, "input")
    speaker = pick_device(sd, output_device, "output")
    mic_rate, mic_channels = _settings(sd, mic, "input", preferred_rate=SAMPLE_RATE)  # the endpointer's own; any other is resampled there
    speaker_rate, speaker_channels = _settings(sd, speaker, "output")

    def open_mic(callback: MicCallback) -> Stream:
        return _start(sd, sd.InputStream, mic, "input", callback, samplerate=mic_rate, channels=mic_channels,
                      blocksize=round(MIC_BLOCK_S * mic_rate))

    def open_speaker(callback: SpeakerCallback) -> Stream:
        # PortAudio's default (high) latency: the callback shares the GIL with a model on the CPU
        return _start(sd, sd.OutputStream, speaker, "output", callback, samplerate=speaker_rate,
                      channels=speaker_channels)

    return AudioPorts(mic["name"], mic_rate, speaker["name"], speaker_rate, open_mic, open_speaker)


def pick_device(sd, spec: str | None, kind: str) -> dict:
    """The device dict for `spec` (an index, or a case-insensitive part of the name) with `kind`
    ("input" | "output") channels; None picks the default device of that kind."""
    flag = f"--{kind}-device"
    usable = [d for d in sd.query_devices() if d[f"max_{kind}_channels"] > 0]
    if not usable:
        raise NoAudioError(f"PortAudio finds no {_WHAT[kind]}: plug one in (and check that this user may use the "
                           f"sound devices), or name one with {flag}; --list-devices shows what it sees.")
    if spec is None:
        default = _defaults(sd)[0 if kind == "input" else 1]
        return next((d for d in usable if d["index"] == default), usable[0])
    if spec.strip().isdigit():
        found = [d for d in usable if d["index"] == int(spec)]
    else:
        exact = [d for d in usable if d["name"].lower() == spec.lower()]
        found = exact or [d for d in usable if spec.lower() in d["name"].lower()]
    if len(found) == 1:
        return found[0]
    names = ", ".join(f"{d['index']}: {d['name']}" for d in (found or usable))
    if found:
        raise NoAudioError(f"{flag} {spec!r} matches several {kind} devices ({names}); "
                           "give more of the name, or the index.")
    raise NoAudioError(f"{flag} {spec!r} matches no {kind} device; the {kind} devices are {names}.")


_WHAT = {"input": "microphone", "output": "speaker or headphones"}


def _defaults(sd) -> tuple[int, int]:
    default_in, default_out = sd.default.device
    return (-1 if default_in is None else int(default_in)), (-1 if default_out is None else int(default_out))


def _settings(sd, device: dict, kind: str, preferred_rate: int | None = None) -> tuple[int, int]:
    """(rate, channels) the device accepts: the preferred rate, else its default; mono, else stereo."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    rates = ([preferred_rate] if preferred_rate else []) + [int(device["default_samplerate"])]
    channels = range(1, min(MAX_CHANNELS, device[f"max_{kind}_channels"]) + 1)
    error = None
    for rate in rates:
        for n in channels:
            try:
                check(device=device["index"], samplerate=rate, channels=n, dtype="float32")
                return rate, n
            except (sd.PortAudioError, ValueError) as exc:
                error = exc
    raise NoAudioError(f"The {kind} device {device['name']!r} refuses to open ({error}); "
                       f"pick another with --{kind}-device (see --list-devices).")


def _start(sd, stream_class, device: dict, kind: str, callback, **settings) -> Stream:
    stream = None
    try:
        stream = stream_class(device=device["index"], dtype="float32", callback=callback, **settings)
        stream.start()
    except (sd.PortAudioError, ValueError) as exc:
        if stream is not None:
            stream.close(ignore_errors=True)
        raise NoAudioError(f"The {kind} device {device['name']!r} could not be opened ({exc}); "
                           f"pick another with --{kind}-device (see --list-devices).") from exc
    return stream


class MicTap:
    """The microphone callback's side: copy each block into a bounded queue and return.

    A feeder thread takes the blocks out; when it falls MIC_QUEUE_S behind, new blocks are dropped
    and counted (the callback must neither block nor grow memory without bound).
    """

    def __init__(self, max_blocks: int) -> None:
        self.blocks: queue.Queue[np.ndarray] = queue.Queue(maxsize=max_blocks)
        self.dropped = 0  # blocks lost to a full queue

    def callback(self, indata: np.ndarray, frames: int, time, status) -> None:
        try:
            self.blocks.put_nowait(indata.copy())  # PortAudio reuses `indata` after we return
        except queue.Full:
            self.dropped += 1


class Playback:
    """Reply audio waiting for the speaker: reply chunks in, the output callback drains it.

    Chunks are resampled to the speaker's rate as they arrive, through one soxr stream per reply
    so chunk edges leave no clicks. `fill` (the callback) plays what there is and silence for the
    rest; `flush` (barge-in) drops everything not yet handed to the device. The lock is held only
    to move arrays in and out, never while resampling.
    """

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate  # Hz of the speaker
        self._pending: deque[np.ndarray] = deque()  # float32 mono at sample_rate, oldest first
        self._offset = 0  # samples of _pending[0] already played
        self._lock = threading.Lock()
        self._reply = SpeechResampler(sample_rate)  # while in a reply, silence is an underrun
        self.underruns = 0  # callbacks that ran dry in the middle of a reply (synthesis too slow)

    @property
    def pending_s(self) -> float:
        """Seconds of audio not yet played."""
        with self._lock:
            return (sum(map(len, self._pending)) - self._offset) / self.sample_rate

    def add(self, chunk: AudioChunk) -> None:
        """Queue a reply chunk (any rate, float32 mono)."""
        self._push(self._reply.push(chunk))

    def end_reply(self) -> None:
        """The reply is complete: queue the resampler's last samples."""
        self._push(self._reply.end())

    def flush(self) -> None:
        """Drop all audio not yet played, at once (the user spoke over the reply)."""
        with self._lock:
            self._pending.clear()
            self._offset = 0
        self._reply.drop()

    def fill(self, out: np.ndarray) -> None:
        """Output callback body: fill `out` [frames, channels] with queued audio, then zeros."""
        done = 0
        with self._lock:
            while done < len(out) and self._pending:
                head = self._pending[0]
                n = min(len(out) - done, len(head) - self._offset)
                out[done:done + n] = head[self._offset:self._offset + n, None]
                done += n
                self._offset += n
                if self._offset == len(head):
                    self._pending.popleft()
                    self._offset = 0
            if done < len(out) and self._reply.in_reply:
                self.underruns += 1
        out[done:] = 0

    def _push(self, samples: np.ndarray) -> None:
        if samples.size:
            with self._lock:
                self._pending.append(samples)
