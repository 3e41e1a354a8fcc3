"""Prompt building: a conversation's messages → the token ids the model sees.

The ids are exactly what the checkpoint's chat template and processor produce: the template renders
the messages as text with one `<sound>` per clip, and each `<sound>` is expanded to
`<|sound_bos|> <sound>×N <|sound_eos|>` (N = the clip's audio tokens). A turn's ids are the text the
template adds for its message (with the generation prompt), so a conversation's ids are the turns'
ids laid end to end. Think mode is a question suffix, and on the Think checkpoint a pre-filled
`<think>` tag. Public: the Session and the OpenAI API build their prompts here.
"""

from __future__ import annotations

from .model import LoadedModel

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
REPLY_OPENS = "<|im_start|>assistant\n"  # the generation prompt (ChatML, as AF-Next's template writes it)


def check_text(text: str, what: str = "The question") -> None:
    """Raise one sentence (TypeError/ValueError) for text the tokenizer must not see; `what` names it."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be text, not {type(text).__name__}.")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as JSON's "\ud800"; the tokenizer raises TypeError
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate at character {exc.start});"
                         " send UTF-8 text.") from None


def check_control_tokens(loaded: LoadedModel, text: str) -> None:
    """Refuse text that spells one of the checkpoint's control tokens (`<sound>`, `<|im_start|>` …): the
    tokenizer would read it as the token itself — an audio slot with no audio, or a forged turn."""
    for token in _control_tokens(loaded):
        if token in text:
            raise ValueError(f"The text contains {token!r}, one of the model's control tokens; remove it.")


def _control_tokens(loaded: LoadedModel) -> tuple[str, ...]:
    found = getattr(loaded.tokenizer, "_afnext_control", None)
    if found is None:
        found = tuple(t for t in loaded.tokenizer.get_added_vocab() if t.startswith("<") and t.endswith(">"))
        loaded.tokenizer._afnext_control = found
    return found


def user_message(text: str, *, has_clip: bool, think: bool, is_think: bool) -> dict:
    """The user message as the chat template sees it: audio first, then the text (with the Think
    instruction appended in Think mode; `is_think` says which instruction the checkpoint wants)."""
    if think:
        hint = THINK_PROMPT if is_think else THINK_PROMPT_INSTRUCT
        text = f"{text.strip()}\n{hint}" if text.strip() else hint
    parts = [{"type": "audio"}] if has_clip else []
    return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def system_message(text: str) -> dict:
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def text_of(message: dict) -> str:
    """A message's words (its text parts, or its content when that is a string)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def render(loaded: LoadedModel, messages: list[dict], generation_prompt: bool) -> str:
    """The chat template's text for `messages` (its default system prompt included)."""
    if not messages:
        return ""
    return loaded.tokenizer.apply_chat_template(messages, chat_template=loaded.chat_template, tokenize=False,
                                                add_generation_prompt=generation_prompt)


def _before(loaded: LoadedModel, history: list[dict]) -> str:
    """The text `history`'s tokens already hold: a system message alone holds none yet (a session's
    tokens start with its first turn, so the system message goes in with that turn's ids)."""
    return render(loaded, history, False) if any(m["role"] != "system" for m in history) else ""


def turn_ids(loaded: LoadedModel, history: list[dict], message: dict | None, clip_tokens: int | None,
             prefill: str = "", aside: str | None = None) -> tuple[list[int], int]:
    """Token ids a reply adds after `history`, and how many of them are `aside`'s: `message`'s template
    text (a user turn, its `<sound>` expanded to `clip_tokens` audio tokens; None: the reply follows
    the history as it stands — the assistant speaks first, or goes on), then `aside` (instructions for
    this reply alone, a system message just before it, which the session takes out once the reply is
    made), then the generation prompt and `prefill` (e.g. THINK_PREFILL)."""
    before = _before(loaded, history)
    # The template's text up to a new assistant turn: with no message and no history it is still the
    # template's own (its default system prompt), which it renders for no empty conversation.
    probe = render(loaded, history + ([message] if message else []) + [assistant_message("")], False)
    opening = probe[:probe.rindex(REPLY_OPENS)]
    assert opening.startswith(before), "the chat template must render a conversation as a prefix of its extension"
    ids = expand_sound(loaded, loaded.tokenizer.encode(opening[len(before):], add_special_tokens=False), clip_tokens)
    aside_ids = loaded.tokenizer.encode(f"<|im_start|>system\n{aside}<|im_end|>\n", add_special_tokens=False) \
        if aside else []
    return ids + aside_ids + reply_head(loaded, prefill), len(aside_ids)


def message_ids(loaded: LoadedModel, history: list[dict], message: dict, clip_tokens: int | None) -> list[int]:
    """Token ids an earlier message adds after `history` (no generation prompt): what a conversation
    resent by a client holds, a user turn or an assistant reply as text. A system message with
    nothing but system messages before it adds none yet: like the opening one, it goes in with the
    first turn's ids (`_before`), which would otherwise hold it twice."""
    if message["role"] == "system" and all(m["role"] == "system" for m in history):
        return []
    before = _before(loaded, history)
    after = render(loaded, history + [message], False)
    assert after.startswith(before), "the chat template must render a conversation as a prefix of its extension"
    return expand_sound(loaded, loaded.tokenizer.encode(after[len(before):], add_special_tokens=False), clip_tokens)


def expand_sound(loaded: LoadedModel, ids: list[int], clip_tokens: int | None) -> list[int]:
    """Replace the one `<sound>` placeholder in `ids` with the clip's span, as the processor does."""
    special, out = loaded.ids, []
    for i in ids:
        if i == special.sound:
            assert clip_tokens, "a <sound> placeholder without a clip"
            out += [special.sound_bos] + [special.sound] * clip_tokens + [special.sound_eos]
        else:
            out.append(i)
    return out


def reply_head(loaded: LoadedModel, prefill: str = "") -> list[int]:
    """What opens an assistant turn: the generation prompt (`<|im_start|>assistant` and a newline),
    then `prefill`."""
    return loaded.tokenizer.encode(REPLY_OPENS + prefill, add_special_tokens=False)


def reply_tail(loaded: LoadedModel) -> list[int]:
    """What closes an assistant turn after its generated ids: `<|im_end|>` and a newline."""
    return [loaded.ids.im_end, *loaded.ids.newline]
