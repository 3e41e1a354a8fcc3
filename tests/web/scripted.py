"""A scripted-output stand-in at the engine boundary, for the browser test of Think steps only.

It runs the real model (prefill and every decoding step, so sessions, caches and timings are real),
then replaces each request's logits so the reply is a fixed text: a random-weight model would never write the
timestamped reasoning the Recordings tab has to draw.
"""

from __future__ import annotations

import time

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

    def __init__(self, loaded: LoadedModel, script: str = SCRIPT, step_delay_s: float = 0.0) -> None:
        super().__init__(loaded)
        self.script = loaded.tokenizer.encode(script, add_special_tokens=False) + [loaded.ids.im_end]
        self.step_delay_s = step_delay_s  # > 0: generation as slow as a big model's, so a reply can be cut in on

    def _forward(self, decodes, prefill):
        time.sleep(self.step_delay_s)
        return [(request, self._forced(logits, len(request.generated)))
                for request, logits in super()._forward(decodes, prefill)]

    def _forced(self, logits: torch.Tensor, at: int) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[self.script[min(at, len(self.script) - 1)]] = 1e4
        return forced
