"""Picking the next token: the options a reply is generated with, checked at the edge, and a picker
that applies them exactly as transformers' `generate` does (repetition penalty over the whole
conversation, then temperature and top-p, or argmax when the temperature is 0)."""

from __future__ import annotations

import numbers
import secrets
from dataclasses import dataclass

import torch

MAX_NEW_TOKENS = 131_072  # tokens: AF-Next's whole context, so no reply can be longer
# Logits span about ±30; divided by 100 they give a softmax that is nearly uniform over the
# vocabulary, so a larger temperature is noise either way and more likely a typo (700 for 0.7).
MAX_TEMPERATURE = 100.0
# Below this, sampling is greedy in all but name, and logits / 1e-300 overflow float32 to inf,
# which softmax turns into NaN (a crash in torch.multinomial).
MIN_TEMPERATURE = 1e-4
# A penalty of 100 already rules a seen token out (or, as 1/100, all but forces it); beyond that
# range the scaled scores, over MIN_TEMPERATURE, could overflow float32 the same way.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


@dataclass(frozen=True)
class GenerationOptions:
    """How a reply is generated. Defaults follow the AF-Next model cards."""

    max_new_tokens: int = 1024  # upper bound on reply tokens (Instruct card: 1024; Think: 4096)
    min_new_tokens: int = 0  # end of turn is forbidden before this many (benchmarks: fixed-length replies)
    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling mass (used only when temperature > 0)
    repetition_penalty: float = 1.2  # as the model cards use; 1.0 switches it off
    seed: int | None = None  # sampling seed, for reproducible sampled replies

    def __post_init__(self) -> None:
        """Refuse values the sampler cannot use (a NaN penalty repeats one token forever)."""
        _check_whole("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _check_whole("min_new_tokens", self.min_new_tokens, 0, MAX_NEW_TOKENS)
        _check_number("temperature", self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE, or_zero=True)
        _check_number("top_p", self.top_p, 0.0, 1.0, above_low=True)
        _check_number("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        if self.seed is not None:
            _check_whole("seed", self.seed, 0, MAX_SEED)


def _check_whole(name: str, value, low: int, high: int) -> None:
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (whole and low <= value <= high):
        raise ValueError(f"{name} must be a whole number from {low:,} to {high:,}; got {_shown(value)}.")


def _check_number(name: str, value, low: float, high: float, *, above_low: bool = False,
                  or_zero: bool = False) -> None:
    allowed = f"above {low:g} and at most {high:g}" if above_low else f"from {low:g} to {high:g}"
    error = ValueError(f"{name} must be {'0 or ' if or_zero else ''}a number {allowed}; got {_shown(value)}.")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error
    # NaN fails every comparison and ±inf the bounds: no finiteness test, which would overflow on a huge int.
    in_range = (low < value if above_low else low <= value) and value <= high
    if not (in_range or or_zero and value == 0):
        raise error


def _shown(value) -> str:
    """A value as an error message quotes it: one line (ascii escapes), at most 40 characters."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:39] + "…"


class TokenPicker:
    """One reply's token choice, as `generate` makes it: repetition penalty over every token of the
    conversation so far, then temperature and top-p (or argmax when the temperature is 0). Many
    pickers choose together in one batched call (`pick`)."""

    def __init__(self, options: GenerationOptions, vocab: int, seen: list[int], device: torch.device,
                 eos: int, never: tuple[int, ...] = ()) -> None:
        # `never`: tokens that are markers of the input, not words (the audio placeholders): one in a reply
        # would be taken for an audio slot when the conversation is prefilled again.
        self.options, self.eos, self.never, self.picked = options, eos, list(never), 0
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen[torch.tensor(seen, dtype=torch.long, device=device)] = True
        self.generator = None
        if options.temperature > 0:
            self.generator = torch.Generator(device=device)
            # unseeded: a seed of its own, leaving torch's global generator (and anyone's manual_seed) alone
            self.generator.manual_seed(options.seed if options.seed is not None else secrets.randbits(63))

    def __call__(self, logits: torch.Tensor) -> int | None:
        """The next token from `logits` [vocab] (None if they hold NaN or +inf: see `pick`)."""
        return pick([self], logits[None])[0]

    def _sample(self, scores: torch.Tensor) -> int:
        probs = torch.softmax(scores / self.options.temperature, dim=-1)
        if self.options.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > self.options.top_p  # keep the top one always
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


def pick(pickers: list[TokenPicker], logits: torch.Tensor) -> list[int | None]:
    """Next tokens for a batch: row i of `logits` [batch, vocab] chosen by `pickers[i]`, each exactly
    as it would be alone (the same elementwise scores; a sampled row draws from its own generator).
    None for a row whose scores hold NaN or +inf (an overflow in half precision): no token can be
    drawn from it (torch.multinomial would fail the whole batch), and its turn alone must fail.

    One host sync for the batch's greedy rows, one per sampled row.
    """
    scores = logits.float().clone()
    if pickers[0].never:
        scores[:, pickers[0].never] = -float("inf")
    early = [i for i, p in enumerate(pickers) if p.picked < p.options.min_new_tokens]
    if early:  # end of turn is forbidden before min_new_tokens
        scores[early, pickers[0].eos] = -float("inf")
    penalised = [i for i, p in enumerate(pickers) if p.options.repetition_penalty != 1.0]
    if penalised:  # over the whole vocabulary: a boolean-mask gather would sync the GPU every token
        rows, seen = scores[penalised], torch.stack([pickers[i].seen for i in penalised])
        penalty = rows.new_tensor([pickers[i].options.repetition_penalty for i in penalised])[:, None]
        scores[penalised] = torch.where(seen, torch.where(rows < 0, rows * penalty, rows / penalty), rows)
    top, tokens = scores.max(dim=-1)  # a row's max is NaN if any score is (torch's max propagates it), or +inf
    broken = torch.isnan(top) | torch.isposinf(top)
    tokens, broken = torch.stack([tokens, broken.long()]).tolist()  # one host sync for both
    for i, picker in enumerate(pickers):
        if broken[i]:
            tokens[i] = None
            continue
        if picker.generator is not None:
            tokens[i] = picker._sample(scores[i])
        picker.seen[tokens[i]] = True
        picker.picked += 1
    return tokens
