"""A scripted-output stand-in at the engine boundary, for the browser test of Think steps only.

It runs the real model (prefill and every decoding step, so sessions, caches and timings are real),
then replaces the logits so the reply is a fixed text: a random-weight model would never write the
timestamped reasoning the Recordings tab has to draw.
"""

from __future__ import annotations

import torch

from afnext.engine import Engine
from afnext.model import LoadedModel

# Times match assets/speech.wav's timeline (assets/README.md).
SCRIPT = ("<think>\nThe speaker introduces the recording from 0.3s to 3.6s. "
          "The note was recorded on Tuesday morning, from 4.0s to 6.9s. "
          "The request to buy milk and eggs comes at 7.3s to 10.2s.\n</think>\n"
          "It is a voice note asking to buy milk and eggs on the way home.")


class ScriptedEngine(Engine):
    """An `Engine` whose every reply is `script` (then end of turn), whatever the model would say."""

    def __init__(self, loaded: LoadedModel, script: str = SCRIPT) -> None:
        super().__init__(loaded)
        self.script = loaded.tokenizer.encode(script, add_special_tokens=False) + [loaded.ids.im_end]
        self._at = 0

    def prefill(self, ids, audio_embeds, cache, cancel):
        logits = super().prefill(ids, audio_embeds, cache, cancel)
        self._at = 0
        return None if logits is None else self._forced(logits)

    def step(self, token: int, cache) -> torch.Tensor:
        return self._forced(super().step(token, cache))

    def _forced(self, logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[self.script[min(self._at, len(self.script) - 1)]] = 1e4
        self._at += 1
        return forced
