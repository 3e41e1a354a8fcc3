"""`python -m app.desktop`: talk with the assistant through this computer's microphone and speaker.

    python -m app.desktop [--model M] [--tts espeak|pocket] [--input-device D] [--output-device D]
                          [--half-duplex] [--think] [--device auto|cpu|cuda]
    python -m app.desktop --server http://gpu-box:7860/ [--api-key K] [--think] [--half-duplex]
                          (the model on the web app's machine, over its /v1/realtime; no torch here)
    python -m app.desktop --list-devices

Speak; the end of your turn is heard by itself, the answer is printed as it streams and spoken as
soon as its first sentence is ready; speak over it and it stops. Ctrl-C quits.

Threads: PortAudio calls the microphone and speaker callbacks on its own thread (they only move
arrays); a feeder thread pushes microphone blocks into the assistant; the main thread reads the
assistant's events, prints them and routes reply audio to the speaker.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, TextIO

import numpy as np

from afnext.cli import add_model_flags, add_tts_flags, add_turn_flag
from afnext.events import (AudioChunk, Error, Interrupted, ReasoningDelta, Stamped, StateChanged, TextDelta, UserTurn,
                           VoiceTurnDone)
from afnext.tts import TTSError, load_synthesizer

from .audio_io import (MIC_BLOCK_S, MIC_QUEUE_S, AudioPorts, MicTap, NoAudioError, Playback, Stream, list_devices,
                       load_sounddevice, sounddevice_ports, stopped)
from .remote import RemoteBrain, RemoteError

if TYPE_CHECKING:
    from afnext.assistant import Assistant

log = logging.getLogger(__name__)

POLL_S = 0.1  # seconds between looks at the stop flag (Ctrl-C) while waiting for events or audio
API_KEY_ENV = "AFNEXT_API_KEY"
GREETING = "Greet the user in one short sentence and say that you are listening."  # --greet's instructions
JOIN_TIMEOUT_S = 5.0  # the feeder waits at most one push; a push waits at most one decoding step
# C0/C1 control characters (bar the newline) shown as U+FFFD: a random-weight model writes ESC and
# friends, which must not drive the terminal.
_CONTROLS = {c: "\ufffd" for c in (*range(32), *range(127, 160)) if c != 10}


class VoiceBrain(Protocol):
    """What the loop drives: afnext's `Assistant` (the model on this machine), or `RemoteBrain`
    (`--server URL`: the model on a web app's machine, through its /v1/realtime)."""

    def push(self, pcm: np.ndarray, sample_rate: int) -> None: ...

    def respond(self, *, instructions: str | None = None) -> None: ...  # a reply with no turn of the user's

    def events(self, timeout: float | None = None) -> Iterator[object]: ...

    @property
    def ended(self) -> bool: ...  # no more events will come (closed, or the connection is gone)

    def close(self) -> None: ...


class Console:
    """The conversation as text: state changes, user turns, the streamed answer, reasoning set
    apart, interruptions, errors and per-turn latencies."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._open: str | None = None  # "answer" | "reasoning": a streamed line not yet ended
        self._held: list[str] = []  # state changes that came mid-stream, written when it ends

    def show(self, event: object) -> None:
        inner = event.event if isinstance(event, Stamped) else event
        if isinstance(inner, StateChanged):
            self._state(f"[{inner.state}]")
        elif isinstance(inner, UserTurn):
            self._line(f"you: ({inner.end - inner.start:.1f} s of speech)")
        elif isinstance(inner, TextDelta):
            self._stream("answer", "assistant: ", inner.text)
        elif isinstance(inner, ReasoningDelta):
            self._stream("reasoning", "  (reasoning) ", inner.text)
        elif isinstance(inner, Interrupted):
            self._line(f"-- interrupted ({inner.reason}) --")
        elif isinstance(inner, Error):
            self._line(f"error: {inner.message}")
        elif isinstance(inner, VoiceTurnDone):
            t = inner.timings
            self._line(f"  latency: endpoint {_seconds(t.endpoint_s)}, first token {_seconds(t.ttft_s)}, "
                       f"first audio {_seconds(t.first_audio_s)}")

    def note(self, text: str) -> None:
        self._line(text)

    def _state(self, text: str) -> None:
        if self._open:
            self._held.append(text)
        else:
            self._write(text + "\n")

    def _stream(self, kind: str, prefix: str, text: str) -> None:
        if self._open != kind:
            self._end()
            self._write(prefix)
            self._open = kind
        self._write(text.translate(_CONTROLS))

    def _line(self, text: str) -> None:
        self._end()
        self._write(text + "\n")

    def _end(self) -> None:
        if self._open:
            self._write("\n")
            self._open = None
        held, self._held = self._held, []
        for text in held:
            self._write(text + "\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def converse(brain: VoiceBrain, ports: AudioPorts, stop: threading.Event, console: Console,
             greet: str | None = None) -> Playback:
    """Run the voice loop until `stop` is set; returns the playback buffer (for its counters).

    Opens the speaker, then the microphone; with `greet` (instructions), the assistant then speaks
    first. On the way out closes both, joins the feeder and closes `brain`. Raises NoAudioError when
    a device cannot be opened.
    """
    tap = MicTap(max_blocks=round(MIC_QUEUE_S / MIC_BLOCK_S))
    playback = Playback(ports.speaker_rate)
    feeder = threading.Thread(target=_feed, args=(brain, tap, ports.mic_rate, stop), name="afnext-mic", daemon=True)
    streams: list[Stream] = []
    try:
        streams.append(ports.open_speaker(lambda outdata, frames, time, status: playback.fill(outdata)))
        streams.append(ports.open_mic(tap.callback))
        feeder.start()
        if greet is not None:  # once both devices are open: the user hears it, and can speak over it
            brain.respond(instructions=greet)
        reported = 0
        while not stop.is_set():
            # `events()` returns both at its timeout and at the end: `ended`, read before, tells them
            # apart (and, once set, this pass gives all that was left).
            ended = brain.ended
            for event in brain.events(timeout=POLL_S):
                _route(event, playback, console)
                if stop.is_set():
                    break
            if ended:
                console.note("The connection to the assistant is gone, so the conversation ends here.")
                break
            if (gone := _device_gone(ports, streams)) is not None:
                console.note(gone)
                break
            if tap.dropped > reported:
                console.note(f"warning: {tap.dropped - reported} microphone blocks dropped (the assistant fell "
                             f"{MIC_QUEUE_S:.0f} s behind)")
                reported = tap.dropped
    finally:
        stop.set()
        for stream in reversed(streams):
            stream.close()
        if feeder.is_alive():
            feeder.join(JOIN_TIMEOUT_S)
        brain.close()
    return playback


def _device_gone(ports: AudioPorts, streams: list[Stream]) -> str | None:
    """One sentence naming the device whose stream stopped by itself (unplugged), else None.
    `streams` are the speaker's then the microphone's, as `converse` opens them."""
    devices = (("speaker", ports.speaker_name, "--output-device"), ("microphone", ports.mic_name, "--input-device"))
    for (kind, name, flag), stream in zip(devices, streams):
        if stopped(stream):
            return (f"The {kind} {name!r} stopped working (was it unplugged?), so the conversation ends here; "
                    f"plug it back in and start again, or pick another with {flag} (see --list-devices).")
    return None


def _route(event: object, playback: Playback, console: Console) -> None:
    """Reply audio to the speaker, everything else to the console; barge-in empties the speaker."""
    inner = event.event if isinstance(event, Stamped) else event
    if isinstance(inner, AudioChunk):
        playback.add(inner)
        return
    if isinstance(inner, Interrupted):
        playback.flush()
    elif isinstance(inner, VoiceTurnDone):
        playback.end_reply()
    console.show(event)


def _feed(brain: VoiceBrain, tap: MicTap, sample_rate: int, stop: threading.Event) -> None:
    """Feeder thread: microphone blocks from the tap into the brain, until `stop`."""
    failing = 0  # blocks failed in a row: a broken VAD fails on every one, 50 a second, so one traceback
    while not stop.is_set():
        try:
            block = tap.blocks.get(timeout=POLL_S)
        except queue.Empty:
            continue
        mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1)
        try:
            brain.push(mono, sample_rate)
        except Exception:  # keep listening: the next block may well work
            if not failing:
                log.exception("the assistant failed on a microphone block")
            failing += 1
            continue
        if failing > 1:
            log.warning("the assistant failed on %d microphone blocks in a row, then took them again", failing)
        failing = 0


def build_assistant(args: argparse.Namespace, console: Console) -> Assistant:
    """Load the synthesizer and the model (the real one, or the demo one when it cannot be had).
    Imported here: with --server, this machine needs neither torch nor transformers."""
    from afnext.assistant import Assistant, AssistantOptions
    from afnext.vad import EndpointerOptions
    from afnext.engine import Engine
    from afnext.model import LICENCE_NOTE, load_or_demo
    from afnext.session import Session

    synthesizer = load_synthesizer(args.tts, model=args.tts_model, device=args.device)
    loaded, notice = load_or_demo(args.model, device=args.device)
    console.note(notice or LICENCE_NOTE)
    if loaded.random_weights:
        console.note("The model in use has RANDOM weights: its answers are noise (the voice loop works as usual).")
    engine = Engine(loaded, kv=args.kv)
    options = AssistantOptions(half_duplex=args.half_duplex, think=args.think,
                               endpointer=EndpointerOptions(semantic=args.turn == "semantic"))
    return Assistant(Session(engine), synthesizer, options)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?"
    console = Console(sys.stdout)
    try:
        sd = load_sounddevice()
        if args.list_devices:
            print(list_devices(sd))
            return 0
        ports = sounddevice_ports(sd, args.input_device, args.output_device)
        return _talk(args, ports, console)
    except NoAudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading
        print("bye")
        return 0


def _talk(args: argparse.Namespace, ports: AudioPorts, console: Console) -> int:
    try:
        if args.server:
            brain = RemoteBrain(args.server, ports.mic_rate, half_duplex=args.half_duplex, think=args.think,
                                api_key=args.api_key or os.environ.get(API_KEY_ENV), semantic=args.turn == "semantic")
            console.note(f"Talking to the assistant at {args.server}.")
        else:
            brain = build_assistant(args, console)
    except (TTSError, ValueError, RemoteError, *_model_errors(args)) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    duplex = ("Half duplex: the microphone is muted while the assistant speaks" if args.half_duplex else
              "Full duplex: speak over the assistant to interrupt it (use --half-duplex on loudspeakers)")
    console.note(f"Microphone: {ports.mic_name} ({ports.mic_rate} Hz). Speaker: {ports.speaker_name} "
                 f"({ports.speaker_rate} Hz). {duplex}. Ctrl-C quits.")
    stop, quit_asked = threading.Event(), threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: (quit_asked.set(), stop.set()))
    try:
        playback = converse(brain, ports, stop, console, greet=args.greet)
        if playback.underruns:
            console.note(f"(the speaker ran dry {playback.underruns} times in the middle of a reply: speech was "
                         "made slower than it played)")
    finally:
        signal.signal(signal.SIGINT, previous)
        if not isinstance(brain, RemoteBrain):
            brain.session.engine.close()
    print("bye")
    # Ended without Ctrl-C: a device or the server went away (the loop said which), so a script or a
    # supervisor running it sees a failure.
    return 0 if quit_asked.is_set() else 1


def _model_errors(args: argparse.Namespace) -> tuple[type[Exception], ...]:
    """ModelLoadError when this machine loads the model (imported only then: --server needs no torch)."""
    if args.server:
        return ()
    from afnext.model import ModelLoadError

    return (ModelLoadError,)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.desktop", description=__doc__.splitlines()[0])
    p.add_argument("--list-devices", action="store_true", help="list the sound devices PortAudio sees and exit")
    p.add_argument("--input-device", help="microphone: index or part of the name (default: the system's)")
    p.add_argument("--output-device", help="speaker: index or part of the name (default: the system's)")
    p.add_argument("--half-duplex", action="store_true",
                   help="mute the microphone while the assistant speaks (loudspeakers without echo cancellation)")
    add_tts_flags(p)
    add_model_flags(p)
    p.add_argument("--think", action="store_true", help="reason before answering (shown, never spoken)")
    p.add_argument("--greet", nargs="?", const=GREETING, metavar="INSTRUCTIONS",
                   help="the assistant speaks first, once the microphone and speaker are open: a greeting, or "
                        "what INSTRUCTIONS ask for (they hold for that reply alone)")
    add_turn_flag(p)
    p.add_argument("--server", metavar="URL",
                   help="the web app (python -m app) on a GPU machine, e.g. http://gpu-box:7860/: its model answers; "
                        "--model, --tts and --device are then the server's business")
    p.add_argument("--api-key", help=f"the server's --api-key, with --server (default: ${API_KEY_ENV})")
    return p


if __name__ == "__main__":
    sys.exit(main())
