"""A step's plan: which requests not decoding yet get encoder work and prompt tokens in it.

The engine (engine.py) runs schedule → execute → update; this is the first third's arithmetic. Every
step has two budgets — audio frames × encoder layers, and prompt tokens to prefill — shared by the
requests that are not decoding yet, most urgent first (scheduler.py: interactive turns, then the
rest, each class first come first served). An interactive turn may take a whole budget; a long
ingest takes at most its chunk of each, so a voice turn asked meanwhile waits out one chunk at most.

A step that carries an interactive turn's work carries no long prefill's beside it: a voice turn
waits for the long one's step in flight, never for a share of the budget it left over. Under a
steady stream of voice turns that rule alone would starve an ingest (every step has an interactive
prefill in it), so a long request passed over PASSED_OVER_MAX steps in a row goes first in the next
one, with its chunk, and the voice turns share what it leaves: it advances at least one chunk every
PASSED_OVER_MAX + 1 steps (with several overdue, the oldest goes first, the next in the step after),
and a voice turn still waits for one chunk at most.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import encoder, mel
from .scheduler import WAITING, Request

# The budgets' defaults. Prompt tokens all of a step's prefills take, and a long prefill's share of
# that (its chunk; an interactive turn may take the whole budget): on a GPU 2,048 tokens of AF-Next take
# tens of ms; on CPU a chunk of the 20 M `mid` model deep in a 10-minute recording takes about as long
# as a 5 s voice turn's whole first step (its encoding and prefill: 0.1 s), the most the benchmark's
# "short turn during an ingest" target allows (256-token chunks took twice that, and a voice turn 2.2×
# its idle TTFT; the recording itself prefills some 10% faster in them), and a step may prefill a few
# voice turns at once. Mel frames encoded per step (3,000 = one 30 s window; a 5 s clip runs 600 of
# them, encoder.py), likewise.
PREFILL_CHUNK_TOKENS = {"cuda": 2048, "cpu": 128}
PREFILL_STEP_TOKENS = {"cuda": 2048, "cpu": 512}
ENCODE_FRAMES_PER_STEP = {"cuda": 16 * mel.WINDOW_FRAMES, "cpu": mel.WINDOW_FRAMES}
# A long ingest's share of that: on CPU half a window, so its 30 s windows take two steps each (half the
# encoder's layers a step) and a voice turn asked meanwhile waits out half a window's encoding, not a
# whole one's (a window's attention spans all of it, so layers are the only place to cut it).
ENCODE_CHUNK_FRAMES = {"cuda": 16 * mel.WINDOW_FRAMES, "cpu": mel.WINDOW_FRAMES // 2}
# Steps in a row a long request may be left out of for interactive ones' work before it goes first
# (with its chunk) in the next: under constant voice traffic it still gets a fifth of the steps.
PASSED_OVER_MAX = 4


@dataclass(frozen=True)
class Budgets:
    """What one step may do for the requests not decoding yet."""

    prefill_chunk_tokens: int  # a long prefill's prompt tokens per step
    prefill_step_tokens: int  # all prefills' prompt tokens per step (an interactive turn may take them all)
    encode_frames_per_step: int  # mel frames through the whole encoder per step (or the layer-equivalent)
    encode_chunk_frames: int  # a long ingest's share of that

    @classmethod
    def default(cls, device_kind: str, *, prefill_chunk_tokens: int | None = None, prefill_step_tokens: int | None = None,
                encode_frames_per_step: int | None = None, encode_chunk_frames: int | None = None) -> Budgets:
        """The defaults for "cuda" or "cpu", any of them overridden; a chunk never exceeds its step."""
        chunk = prefill_chunk_tokens or PREFILL_CHUNK_TOKENS[device_kind]
        frames = encode_frames_per_step or ENCODE_FRAMES_PER_STEP[device_kind]
        return cls(chunk, max(prefill_step_tokens or PREFILL_STEP_TOKENS[device_kind], chunk), frames,
                   min(encode_chunk_frames or ENCODE_CHUNK_FRAMES[device_kind], frames))


class Planner:
    """Shares a step's budgets out (`plan`); touches no tensor."""

    def __init__(self, budgets: Budgets, encoder_layers: int) -> None:
        self.budgets, self.encoder_layers = budgets, encoder_layers

    def plan(self, candidates: list[Request], admit: Callable[[Request], bool]) -> list[Request]:
        """This step's prefill work out of `candidates` (most urgent first): each planned request is
        given encoder work (`step_windows` whole windows, or `step_layers` of one window's layers) and
        prompt tokens (`step_tokens`) until the budgets are spent. A waiting request is started
        (`admit`, the engine's: False when its KV cache does not fit) when its turn comes and it gets
        work now; one that does not fit holds the waiting ones behind it (first come, first served),
        not the started ones."""
        full = self.budgets.encode_frames_per_step * self.encoder_layers
        work, tokens, planned, admitting, interactive = full, self.budgets.prefill_step_tokens, [], True, False
        due = next((r for r in candidates if not r.interactive and r.passed_over >= PASSED_OVER_MAX), None)
        for request in ([due] + [r for r in candidates if r is not due]) if due else candidates:
            if work <= 0 and tokens <= 0:
                break
            if interactive and not request.interactive and request is not due:
                continue
            if request.state == WAITING:  # started only when its turn comes and it gets work now
                if not (admitting and (work if request.clips else tokens) > 0 and admit(request)):
                    # the waiting ones behind it wait too (but not behind an overdue one: it was put
                    # first for its work, not to change who starts first)
                    admitting = request is due
                    continue
            work -= self._encoding(request, work, fresh=work == full)
            if request.windows_done + request.step_windows == len(request.windows) and (
                    request.encoding is None or request.step_layers == request.encoding.layers_left):
                # encoded by this step's end: it may prefill in it
                share = tokens if request.interactive else min(tokens, self.budgets.prefill_chunk_tokens)
                request.step_tokens = min(share, len(request.ids) - request.fed)
                tokens -= request.step_tokens
            else:
                request.step_tokens = 0
            if request.step_windows or request.step_layers or request.step_tokens:
                planned.append(request)
                interactive = interactive or request.interactive
                request.passed_over = 0
        if interactive:  # the long ones left out for the interactive ones' sake
            for request in candidates:
                if not request.interactive and request not in planned:
                    request.passed_over += 1
        return planned

    def _encoding(self, request: Request, work: int, fresh: bool) -> int:
        """Give `request` encoder work out of `work` (frames × layers left in this step); returns what
        it takes. Whole windows while they fit its share — the step's budget for an interactive turn,
        `encode_chunk_frames` for a long ingest — else the next layers of the window it has part-way
        through the encoder, or of its next window. `fresh`: no encoder work is planned in this step
        yet, so it takes a layer at least, fitting or not."""
        layers = self.encoder_layers
        share = max(0, work if request.interactive else min(work, self.budgets.encode_chunk_frames * layers))
        request.step_windows = request.step_layers = 0
        if request.encoding is not None:  # a window part-way through the layers
            per_layer = request.encoding.frames
            request.step_layers = min(request.encoding.layers_left, share // per_layer or int(fresh))
            return request.step_layers * per_layer
        used = 0
        for clip, index in request.windows[request.windows_done:]:
            per_layer = encoder.run_frames(clip.frames[index])
            if used + per_layer * layers > share and not request.step_windows:
                # its next window does not fit whole: it goes through some layers (or whole, if the
                # encoder has one layer and nothing else runs in this step)
                request.step_layers = share // per_layer or int(fresh)
                if request.step_layers < layers:
                    used += request.step_layers * per_layer
                    break
                request.step_layers = 0
            elif used + per_layer * layers > share:
                break
            used += per_layer * layers
            request.step_windows += 1
        return used
