"""The voice loop's brain: microphone PCM in; turns, streamed text and speech out.

mic PCM → endpointer → a session turn whose audio is the utterance → streamed answer → chunker →
synthesizer → events. No UI here: shells push microphone audio in and read events out. The
synthesizer is a stage of its own, fed the answer's pieces as they complete: text reaches the
shells as it is generated, however slow the voice.

One clock: the microphone timeline (seconds of audio pushed), carried on by wall time since the
last push. Replayed files and live microphones thus share timestamps, and "is the assistant still
speaking" is known without the shell reporting its playback: speech plays in real time from its
first chunk, so it ends `audio emitted` seconds later.

Barge-in: speech confirmed by the endpointer (≥ its min_speech_ms, 250 ms) while the assistant is
thinking or speaking cancels the turn at once — generation stops before the engine's next step, no
reply audio or text is emitted after `Interrupted` — and that speech becomes the next turn. Nothing
waits for the cancelled turn's thread: its late output is recognised as stale and dropped. Speech
that goes on past a turn the endpointer ended by force (max_utterance_s, no pause) barges in on it
too, and the turn it becomes carries what was said before, unless the session kept that turn.
Half-duplex ignores the microphone while the assistant speaks (loudspeakers without echo cancellation).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .audio import SAMPLE_RATE, AudioError
from .engine import ContextFullError
from .events import (END_OF_EVENTS, AudioChunk, Error, Interrupted, ReasoningDelta, ReplyAsked, Stamped, StateChanged,
                     TextDelta, TurnDone, UserTurn, VoiceTimings, VoiceTurnDone, drain)
from .journal import KeptError
from .sampling import GenerationOptions
from .session import Session
from .tts import Synthesizer, TTSError
from .tts.chunker import SpeechChunker
from .vad import Endpointer, EndpointerOptions, SpeechStarted, UtteranceEnded

log = logging.getLogger(__name__)

MAX_CARRIED_S = 120.0  # an utterance that goes on past forced ends of turn carries at most this much


@dataclass(frozen=True)
class AssistantOptions:
    """How the voice loop behaves."""

    half_duplex: bool = False  # ignore the microphone while reply audio plays (no echo cancellation at hand)
    # nothing the user says interrupts a reply (a Realtime client's interrupt_response false). With
    # `answer`, the microphone is ignored from a turn's end until its reply has played (a turn heard
    # meanwhile would start over the reply); without, what is said then is heard and reported as any
    # utterance, for the caller to answer once the reply is done
    uninterruptible: bool = False
    think: bool = False  # reason before answering; the reasoning is shown, never spoken
    generation: GenerationOptions = GenerationOptions(max_new_tokens=256)  # spoken replies stay short
    endpointer: EndpointerOptions = EndpointerOptions()  # its min_speech_ms is also the barge-in threshold
    answer: bool = True  # answer each utterance the endpointer hears; False: report it (UserTurn), `say` answers


class Assistant:
    """Push microphone audio with `push`; read events with `events()`. Thread-safe between one
    feeding thread and one reading thread."""

    def __init__(self, session: Session, synthesizer: Synthesizer, options: AssistantOptions = AssistantOptions()) -> None:
        self.session, self.synthesizer, self.options = session, synthesizer, options
        self.endpointer = Endpointer(options.endpointer)
        self._out: queue.Queue = queue.Queue()
        self._lock = threading.RLock()  # orders barge-in against reply audio, and state changes
        self._mic_s = 0.0  # seconds of microphone audio pushed
        self._mic_wall = time.perf_counter()  # when the last push arrived
        self._clock, self._clock_lock = 0.0, threading.Lock()  # the latest time `now` gave
        self._turn: _Turn | None = None
        self._goes_on: _Turn | None = None  # a turn ended by force that the user talked on from
        self._speaking_until = 0.0  # microphone-clock time the emitted speech finishes playing
        self._closed = False  # set by close(), after its END_OF_EVENTS
        self.state = "listening"

    def now(self) -> float:
        """The microphone clock: audio pushed so far, carried on by wall time since the last push. It
        never steps back: a burst of audio after a late callback starts with less than the wall time
        that passed, and the clock waits for the audio to catch up (stamps stay in order)."""
        with self._clock_lock:
            self._clock = max(self._clock, self._mic_s + (time.perf_counter() - self._mic_wall))
            return self._clock

    @property
    def busy(self) -> bool:
        """A turn is being generated (a cancelled one winding down does not count)."""
        turn = self._turn
        return turn is not None and not turn.cancel.is_set() and turn.thread.is_alive()

    @property
    def speaking(self) -> bool:
        return self.busy or self.now() < self._speaking_until

    def push(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Feed microphone audio (any size, rate, int16 or float). Never blocks on the model."""
        # Half duplex mutes only while reply audio plays (its echo is what must not be heard), not
        # while the answer is being thought of: what the user says then is heard as usual.
        if (self.options.half_duplex and self.now() < self._speaking_until) or (
                self.options.uninterruptible and self.options.answer and self.speaking):
            pcm = np.zeros(len(pcm), np.float32)  # keep the endpointer's timeline, hear nothing
        events = self.endpointer.push(pcm, sample_rate)
        self._mic_s += len(pcm) / sample_rate
        self._mic_wall = time.perf_counter()
        if self.state == "speaking" and not self.speaking:  # the reply has finished playing
            self._set_state("listening", self._speaking_until)
        for event in events:
            self._on_endpointer(event)

    def flush(self) -> None:
        """End of microphone input: an utterance in progress becomes a turn."""
        for event in self.endpointer.flush():
            self._on_endpointer(event)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the current turn (if any) has finished generating; False on timeout."""
        turn = self._turn
        if turn is not None:
            turn.thread.join(timeout)
            return not turn.thread.is_alive()
        return True

    def events(self, timeout: float | None = None) -> Iterator[object]:
        """Events as they happen; ends at `close()` or after `timeout` seconds without one (None: never)."""
        return drain(self._out, timeout)

    @property
    def ended(self) -> bool:
        """`close()` was called: `events()` gives what is left, then ends at once."""
        return self._closed

    def interrupt(self) -> None:
        """Barge in from the shell (a push-to-talk press): cancel the turn and silence the reply."""
        self._interrupt(self.now())

    def forget_speech(self) -> None:
        """Drop what the endpointer has heard of an utterance in progress (push-to-talk takes over).
        Call from the feeding thread."""
        self.endpointer.discard()

    def say(self, audio: np.ndarray | None, text: str = "", *, tag: object = None,
            generation: GenerationOptions | None = None, instructions: str | None = None) -> None:
        """A whole user turn that ended just now — an utterance (float32 mono 16 kHz), text, or both —
        becomes the next turn, without the endpointer: push-to-talk, where the button, not the silence,
        marks the end of the turn, or a typed message. `tag` comes back on the turn's UserTurn (the
        caller's name for it: a protocol's item id); `generation`, this turn's own options;
        `instructions`, for its reply alone (`Session.ask`)."""
        if audio is None and not text.strip():
            raise ValueError("A turn needs audio, text, or both.")
        if self.speaking:
            self._interrupt(self.now())
        now = self.now()
        audio = np.zeros(0, np.float32) if audio is None else audio
        self._start_turn(UtteranceEnded(now, max(0.0, now - len(audio) / SAMPLE_RATE), now, audio), text, tag,
                         generation, instructions=instructions)

    def respond(self, *, tag: object = None, generation: GenerationOptions | None = None,
                instructions: str | None = None) -> None:
        """A reply with no new user turn (`Session.respond`): the assistant greets the user before they
        say anything, or goes on after its last reply. Reported as ReplyAsked (with `tag`), then as any
        reply."""
        if self.speaking:
            self._interrupt(self.now())
        now = self.now()
        self._start_turn(UtteranceEnded(now, now, now, np.zeros(0, np.float32)), tag=tag, generation=generation,
                         instructions=instructions, user=False)

    def close(self) -> None:
        """Cancel any turn, wait for it, and end `events()`."""
        self._interrupt(self.now(), emit=False)
        self._out.put(END_OF_EVENTS)
        self._closed = True

    # ---- endpointer events (feeding thread) ----

    def _on_endpointer(self, event) -> None:
        if isinstance(event, SpeechStarted):
            self._emit(event)
            if self.speaking and not self.options.uninterruptible:
                running = self._turn
                # The user went on talking past a turn ended by force (max_utterance_s): they are not done.
                # Its answer is cut off as by any barge-in, and the turn they go on with also carries what
                # they said before, unless the session kept that (its reply had begun).
                if running is not None and running.ended.forced and not running.cancel.is_set() \
                        and self._goes_on_from(running, event.t):
                    self._goes_on = running
                self._interrupt(self.now())
        elif isinstance(event, UtteranceEnded) and self.options.answer:
            # A reply begun while they spoke (a greeting asked for as the user began): their turn cuts it
            # off, as speech over it does; else it ran on unheard, kept whole, and held their answer back.
            if self.speaking and not self.options.uninterruptible:
                self._interrupt(self.now())
            after, self._goes_on = self._goes_on, None
            self._start_turn(event, after=after if after is not None and self._goes_on_from(after, event.start) else None)
        elif isinstance(event, UtteranceEnded):  # heard, kept by the caller until it asks for an answer
            self._emit(UserTurn(event.t, event.start, event.end, event.audio, answered=False))

    def _goes_on_from(self, turn: _Turn, onset: float) -> bool:
        """Speech from `onset` follows `turn`'s end with no pause that would have ended a turn."""
        return onset - turn.ended.end <= self.options.endpointer.hangover_ms / 1000

    def _interrupt(self, t: float, emit: bool = True) -> None:
        with self._lock:
            turn, was_speaking = self._turn, self.speaking
            if turn is not None:
                turn.cancel.set()
            self._speaking_until = 0.0
            if emit and was_speaking:
                self._emit(Interrupted("the user spoke"), t)
        self._set_state("listening", t)  # the cancelled turn's thread winds down alone; its output is dropped

    def _start_turn(self, ended: UtteranceEnded, text: str = "", tag: object = None,
                    generation: GenerationOptions | None = None, after: _Turn | None = None,
                    instructions: str | None = None, user: bool = True) -> None:
        # No join: the session starts this turn once the engine has settled the last one (one step
        # after its cancel), and anything the old turn's thread still produces is stale and dropped.
        self._emit(UserTurn(ended.t, ended.start, ended.end, ended.audio, tag=tag) if user else ReplyAsked(ended.t, tag))
        turn = _Turn(ended, time.perf_counter(), text, generation, after=after, instructions=instructions, user=user)
        turn.thread = threading.Thread(target=self._run_turn, args=(turn,), name="afnext-voice-turn", daemon=True)
        self._turn = turn
        self._set_state("thinking", ended.t)
        turn.thread.start()

    # ---- the turn (its own thread) ----

    def _run_turn(self, turn: _Turn) -> None:
        reply = None
        try:
            reply = self._converse(turn)
            turn.kept = reply is not None
        except (KeptError, AudioError, ContextFullError) as exc:  # the conversation cannot be kept (deleted,
            # the disk), the audio cannot be heard (too short), the context is full: its own sentence
            log.warning("voice turn not taken: %s", exc)
            self._emit(Error(str(exc)))
        except Exception as exc:  # one sentence to the user, the traceback to the log, keep listening
            log.exception("voice turn failed")
            self._emit(Error(f"The assistant could not answer that turn ({type(exc).__name__}: {exc})."))
        timings = VoiceTimings(turn.ended.t - turn.ended.end, turn.first_text, turn.first_audio)
        self._emit(VoiceTurnDone(self.now(), timings, reply))
        if not turn.cancel.is_set() and self.now() >= self._speaking_until:
            self._set_state("listening", self.now())

    def _converse(self, turn: _Turn):
        """The turn's text as it is generated; its speech on a stage of its own (`_voice`), fed piece
        by piece, so a slow voice never holds the text back. Returns once both are done."""
        chunker, reply = SpeechChunker(), None
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        voice = threading.Thread(target=self._voice, args=(turn, pieces), name="afnext-voice-speak", daemon=True)
        voice.start()
        try:
            options = turn.generation or self.options.generation
            if turn.user:
                audio = turn.audio = self._heard(turn)
                stream = self.session.ask(turn.text, audio, think=self.options.think, options=options,
                                          cancel=turn.cancel, instructions=turn.instructions)
            else:
                stream = self.session.respond(options=options, cancel=turn.cancel, instructions=turn.instructions)
            for event in stream:
                if isinstance(event, TurnDone):
                    reply = event.reply
                if self._stale(turn):
                    continue  # read on to the end: the reply as far as it got is the turn's record
                if isinstance(event, (TextDelta, ReasoningDelta)):
                    with self._lock:  # as in _speak: no text after Interrupted, whenever the barge-in lands
                        if self._stale(turn):
                            continue
                        turn.first_text = turn.first_text or time.perf_counter() - turn.decided
                        self._emit(event)
                if isinstance(event, TextDelta):
                    for piece in chunker.feed(event):
                        pieces.put(piece)
            for piece in chunker.flush():
                pieces.put(piece)
        finally:
            pieces.put(None)
            voice.join()  # the turn is done once its speech is out (or, cancelled, dropped)
        return reply

    def _heard(self, turn: _Turn) -> np.ndarray | None:
        """The turn's audio (None for a typed turn), after that of the forced turn it goes on from when the
        session did not keep that one: its thread ends within a step of its cancel, before this turn
        could begin anyway. At most MAX_CARRIED_S are carried (a noise that never pauses would grow it
        for ever)."""
        audio = turn.ended.audio
        after = turn.after
        if after is not None:
            after.thread.join()
            before = after.audio if after.audio is not None else after.ended.audio
            if not after.kept and len(before) + len(audio) <= MAX_CARRIED_S * SAMPLE_RATE:
                audio = np.concatenate([before, audio])
            elif not after.kept:
                log.warning("an utterance went on past %.0f s without a pause; its first %.0f s are dropped",
                            MAX_CARRIED_S, len(before) / SAMPLE_RATE)
        return audio if len(audio) else None

    def _voice(self, turn: _Turn, pieces: queue.SimpleQueue) -> None:
        """The speech stage of one turn: pieces in, audio chunks out, until the end mark."""
        while (piece := pieces.get()) is not None:
            if self._stale(turn):
                continue  # drain: a cancelled turn's pieces are not spoken
            try:
                self._speak(turn, piece)
            except Exception as exc:  # the voice failed: the text goes on, unspoken; said once
                if isinstance(exc, TTSError):  # its own sentence (a server with no voice says why)
                    log.warning("reply not spoken: %s", exc)
                    self._emit(Error(f"The reply could not be spoken: {exc}"))
                else:
                    log.exception("speaking a piece failed")
                    self._emit(Error(f"The reply could not be spoken ({type(exc).__name__}: {exc})."))
                while pieces.get() is not None:
                    pass
                return

    def _stale(self, turn: _Turn) -> bool:
        """A cancelled or superseded turn: nothing of it may reach the user any more."""
        return turn.cancel.is_set() or turn is not self._turn

    def _speak(self, turn: _Turn, text: str) -> None:
        for chunk in self.synthesizer.stream(text, cancel=turn.cancel):
            with self._lock:  # after Interrupted, not one more sample
                if self._stale(turn):
                    return
                now = self.now()
                if turn.first_audio is None:
                    turn.first_audio = time.perf_counter() - turn.decided
                    self._set_state("speaking", now)
                self._speaking_until = max(self._speaking_until, now) + len(chunk.samples) / chunk.sample_rate
                self._emit(chunk, now)

    def _set_state(self, state: str, t: float) -> None:
        with self._lock:  # the feeding and the turn threads both move the state
            if state != self.state:
                self.state = state
                self._emit(StateChanged(t, state))

    def _emit(self, event, t: float | None = None) -> None:
        if isinstance(event, (TextDelta, ReasoningDelta, AudioChunk, Interrupted, Error)):
            event = Stamped(self.now() if t is None else t, event)
        self._out.put(event)




@dataclass
class _Turn:
    ended: UtteranceEnded
    decided: float  # perf_counter at the end-of-turn decision
    text: str = ""  # typed text of the turn (beside or instead of its audio)
    generation: GenerationOptions | None = None  # this turn's own (`say`), else the assistant's
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    first_text: float | None = None  # seconds after the decision
    first_audio: float | None = None
    after: _Turn | None = None  # the turn ended by force that this one goes on from (see `_on_endpointer`)
    audio: np.ndarray | None = None  # what the session heard: the utterance, after what it went on from
    kept: bool = False  # the session holds the turn (its reply began)
    instructions: str | None = None  # for this turn's reply alone
    user: bool = True  # False: a reply with no user turn (`respond`)
