"""A conversation with AF-Next: any number of turns, each with its own optional audio clip.

The session keeps the conversation as the model sees it (`tokens`) and a KV cache of it, so a new
turn encodes only its own clip and prefills only its own tokens. The token layout is exactly what the
checkpoint's chat template and processor produce for the messages (each clip its own
`<|sound_bos|> <sound>×N <|sound_eos|>` span, its time starting at 0), with each assistant turn
holding the ids it generated followed by `<|im_end|>` and a newline.

A cancelled reply stays in the conversation as far as it got, closed with `<|im_end|>`, so the model
knows what it had said before it was interrupted. A turn cancelled before its prefill finished, or one
that failed, leaves the session exactly as it was before the turn.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from .clip import Clip, prepare_clip
from .engine import Cancel, Engine
from .events import Interrupted, ReasoningDelta, Reply, TextDelta, ThinkStep, Timings, TurnDone
from .kvcache import new_cache
from .sampling import GenerationOptions, TokenPicker
from .think import ThinkParser

TurnEvent = TextDelta | ReasoningDelta | ThinkStep | Interrupted | TurnDone

# Appended to the question in Think mode. The Think checkpoint also gets its turn pre-filled with
# "<think>\n"; the Instruct one is asked for the tags so its reasoning can be told from its answer.
THINK_PROMPT = "Reason step by step with timestamps, then give the final answer."
THINK_PROMPT_INSTRUCT = ("Reason step by step inside <think> and </think>, citing the times in the audio "
                         "(for example 12.5s to 14.0s), then give the final answer after </think>.")
THINK_PREFILL = "<think>\n"
# characters of one turn's text: about 8,000 tokens, far beyond any typed or spoken question. Longer
# text is refused before the tokenizer spends seconds on it, and with the right advice: a 1 MB paste
# would otherwise be told the conversation is full and to start a new one, which does not help.
MAX_TEXT_CHARS = 32_000


class ContextFullError(ValueError):
    """The conversation no longer fits the model's context; the message says what to do."""


class Session:
    """One conversation. Not thread-safe: one `ask` at a time (the engine serializes the GPU work)."""

    def __init__(self, engine: Engine, *, system: str | None = None, use_cache: bool = True) -> None:
        self.engine = engine
        self.use_cache = use_cache  # False: recompute everything every turn (the reference path)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.tokens: list[int] = []  # the whole conversation as token ids
        self._cache = None  # KV cache holding tokens[:self._cached]
        self._cached = 0
        self._clips: list[Clip] = []  # every clip so far, kept for the no-cache path only
        self._last_clip_s: float | None = None  # duration of the latest clip: what Think steps point into

    def ask(self, text: str = "", audio=None, *, think: bool = False,
            options: GenerationOptions = GenerationOptions(), cancel=None) -> Iterator[TurnEvent]:
        """Add a user turn (text and/or audio) and stream the reply.

        `audio` is a path, bytes, `(sample_rate, array)`, a 16 kHz float32 array, or a `Clip` made
        earlier by `prepare_clip` (a recording decoded once, asked about in several sessions). Yields
        `ReasoningDelta`/`TextDelta`/`ThinkStep` as the reply is generated, then `Interrupted` if it was
        cancelled, then `TurnDone`. Raises `AudioError`, `ContextFullError` or `ValueError` for bad input
        before anything changes. Closing the generator, or setting `cancel` (a threading.Event), stops
        the reply within one decoding step. Nothing runs on the model until the stream is iterated.
        """
        t0 = time.perf_counter()
        _check_text(text)
        if not text.strip() and audio is None:
            raise ValueError("A turn needs a question, an audio clip, or both.")
        loaded = self.engine.loaded
        clip = audio if isinstance(audio, Clip) or audio is None else prepare_clip(
            audio, loaded.mel_filters, max_seconds=loaded.max_audio_s)
        prefill = THINK_PREFILL if think and loaded.is_think else ""
        message = self._user_message(text, clip, think)
        ids = self._turn_ids(message, clip, prefill)
        plan = _Plan(ids, clip, message, options, t0, self._budget(len(ids), options))
        clip_s = clip.duration_s if clip else self._last_clip_s
        parser = ThinkParser(started=bool(prefill), clip_duration_s=clip_s, steps_from_answer=think)
        return self._stream(plan, parser, prefill, cancel)

    def _stream(self, plan: _Plan, parser: ThinkParser, prefill: str, cancel) -> Iterator[TurnEvent]:
        detok = Detokenizer(self.engine.loaded.tokenizer)
        finished: _Finished | None = None
        for item in self.engine.stream(partial(self._turn, plan), cancel):
            if isinstance(item, _Finished):
                finished = item
            elif piece := detok.feed(item):
                yield from parser.feed(piece)
        yield from parser.feed(detok.flush())
        yield from parser.close()
        if finished is None:  # cancelled before the prefill finished: the turn did not happen
            yield Interrupted("cancelled before the reply started")
            return
        if finished.interrupted:
            yield Interrupted()
        yield TurnDone(Reply(
            text=prefill + detok.text, reasoning=parser.reasoning, answer=parser.answer, steps=tuple(parser.steps),
            token_ids=finished.token_ids, prompt_tokens=finished.prompt_tokens, timings=finished.timings,
            interrupted=finished.interrupted))

    # ---- building the turn's tokens (caller thread) ----

    def _user_message(self, text: str, clip: Clip | None, think: bool) -> dict:
        if think:
            hint = THINK_PROMPT if self.engine.loaded.is_think else THINK_PROMPT_INSTRUCT
            text = f"{text.strip()}\n{hint}" if text.strip() else hint
        parts = [{"type": "audio"}] if clip else []
        return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not messages:
            return ""
        tok = self.engine.loaded.tokenizer
        return tok.apply_chat_template(messages, chat_template=self.engine.loaded.chat_template, tokenize=False,
                                       add_generation_prompt=generation_prompt)

    def _turn_ids(self, message: dict, clip: Clip | None, prefill: str) -> list[int]:
        """Token ids this turn adds: the template's text for it, each <sound> expanded to its clip."""
        before = self._render(self.messages, False)
        after = self._render(self.messages + [message], True)
        assert after.startswith(before), "the chat template must render a conversation as a prefix of its extension"
        ids = self.engine.loaded.tokenizer.encode(after[len(before):] + prefill, add_special_tokens=False)
        special = self.engine.loaded.ids
        out: list[int] = []
        for i in ids:
            if i == special.sound:
                assert clip is not None, "a <sound> placeholder without a clip"
                out += [special.sound_bos] + [special.sound] * clip.tokens + [special.sound_eos]
            else:
                out.append(i)
        return out

    def _budget(self, new: int, options: GenerationOptions) -> int:
        """Reply tokens allowed: max_new_tokens, cut to what is left of the context."""
        limit = self.engine.loaded.context_tokens
        used = len(self.tokens) + new
        if used >= limit:
            raise ContextFullError(f"This turn would bring the conversation to {used} tokens, over the model's "
                                   f"{limit}-token context; start a new conversation.")
        return max(0, min(options.max_new_tokens, limit - used))

    # ---- the turn itself (engine worker thread) ----

    def _turn(self, plan: _Plan, cancel: Cancel, emit) -> None:
        if cancel.is_set():
            return
        saved = (len(self.tokens), len(self.messages), len(self._clips), self._cached, self._cache, self._last_clip_s)
        try:
            self._generate(plan, cancel, emit)
        except BaseException:
            self._restore(saved)
            raise

    def _generate(self, plan: _Plan, cancel: Cancel, emit) -> None:
        engine, loaded = self.engine, self.engine.loaded
        clips = ([] if self.use_cache else self._clips) + ([plan.clip] if plan.clip else [])
        ids = (self.tokens[self._cached:] if self.use_cache else self.tokens) + plan.ids
        cache = self._cache if self.use_cache and self._cache is not None else new_cache()
        if self.use_cache:  # the reference path's cache lives for one turn: nothing to keep
            engine.keeper.claim(cache, (len(ids) + plan.budget) * engine.kv_bytes_per_token)
        cache.reserve(cache.get_seq_length() + len(ids) + plan.budget)  # one allocation for the whole turn
        t_enc = time.perf_counter()
        embeds = torch.cat([engine.encode(c) for c in clips]) if clips else None
        t_pre = _sync(loaded.device)
        logits = engine.prefill(ids, embeds, cache, cancel)
        if logits is None:
            raise _CancelledInPrefill
        t_gen = _sync(loaded.device)
        self._commit_user(plan, cache)
        picker = TokenPicker(plan.options, logits.shape[-1], self.tokens, loaded.device, loaded.ids.im_end)
        generated, fed, t_first = [], 0, None
        step = engine.decoder(cache, cache.get_seq_length() + plan.budget)
        try:
            while len(generated) < plan.budget:
                token = picker(logits)
                if token == loaded.ids.im_end:
                    break
                generated.append(token)
                t_first = t_first or time.perf_counter()
                emit(token)
                if cancel.is_set() or len(generated) == plan.budget:
                    break
                logits = step(token)
                fed += 1
        finally:
            engine.end_decoding(cache)
        t_end = time.perf_counter()
        interrupted = cancel.is_set() and len(generated) < plan.budget
        prompt_tokens = len(self.tokens)
        self._commit_reply(generated, fed)
        decoding = (len(generated) - 1) / (t_end - t_first) if len(generated) > 1 else 0.0
        timings = Timings(audio_s=plan.clip.load_s if plan.clip else 0.0, encode_s=t_pre - t_enc,
                          prefill_s=t_gen - t_pre, ttft_s=(t_first or t_end) - plan.t0, decode_tok_s=decoding,
                          new_tokens=len(generated))
        emit(_Finished(tuple(generated), prompt_tokens, timings, interrupted))

    def _commit_user(self, plan: _Plan, cache) -> None:
        self.tokens += plan.ids
        self.messages.append(plan.message)
        if plan.clip:
            self._last_clip_s = plan.clip.duration_s
            if not self.use_cache:
                self._clips.append(plan.clip)
        self._cache, self._cached = cache, len(self.tokens)

    def _commit_reply(self, generated: list[int], fed: int) -> None:
        loaded = self.engine.loaded
        text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        self._cached = len(self.tokens) + fed
        self.tokens += generated + [loaded.ids.im_end] + list(loaded.ids.newline)
        if not self.use_cache:
            self._cache, self._cached = None, 0

    def _restore(self, saved: tuple) -> None:
        n_tokens, n_messages, n_clips, cached, cache, last_clip_s = saved
        del self.tokens[n_tokens:], self.messages[n_messages:], self._clips[n_clips:]
        if cache is not None and cache.get_seq_length() > cached:
            cache.crop(cached - cache.get_seq_length())
        self._cache, self._cached, self._last_clip_s = cache, cached, last_clip_s


class Detokenizer:
    """Token ids → text deltas, holding back bytes of a character split across tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # ids[_prefix:_read] is the context already turned into text

    def feed(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        seen = decode(self.ids[self._prefix:self._read])
        full = decode(self.ids[self._prefix:])
        if len(full) <= len(seen) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self.text += full[len(seen):]
        return full[len(seen):]


@dataclass(frozen=True)
class _Plan:
    ids: list[int]  # tokens the turn adds before the reply
    clip: Clip | None
    message: dict  # the user message as the chat template sees it
    options: GenerationOptions
    t0: float  # perf_counter at the request
    budget: int  # reply tokens allowed


@dataclass(frozen=True)
class _Finished:
    token_ids: tuple[int, ...]
    prompt_tokens: int
    timings: Timings
    interrupted: bool


class _CancelledInPrefill(Exception):
    """Raised on the worker to roll a turn back that was cancelled before its reply began."""


def _check_text(text: str) -> None:
    """One sentence for question text the tokenizer must not see."""
    if not isinstance(text, str):
        raise TypeError(f"The question must be text, not {type(text).__name__}.")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"The question is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as JSON's "\ud800"; the tokenizer raises TypeError
        raise ValueError(f"The question is not valid Unicode (a lone surrogate at character {exc.start});"
                         " send UTF-8 text.") from None


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
