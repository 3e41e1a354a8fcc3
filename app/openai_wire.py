"""OpenAI's Chat Completions on the wire: typed requests parsed once at the edge, and the response,
chunk and error shapes, built the same way for every reply.

Requests follow the openai SDK (3.x): content as a string or parts — `text`, `input_audio`
`{data: base64, format}`, `audio_url` (a `data:` URI only) — the usual sampling fields, vLLM's
extensions (`repetition_penalty`, `min_tokens`, `ignore_eos`) and our `think` flag. Unknown fields
are ignored, as OpenAI's own server does with fields it has retired. Every optional field may be null,
as OpenAI's reference defines them, meaning its default.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from afnext.sampling import MAX_NEW_TOKENS

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "webm", "m4a", "mp4", "opus", "aac", "pcm16")
MAX_MESSAGES = 256  # messages in one request: a long voice conversation, not a flood
MAX_STOP_SEQUENCES = 4  # as OpenAI allows
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 2.0  # as OpenAI allows (the library takes up to 100: beyond 2 is noise, likely a typo)
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1  # OpenAI's int64, and the library's unsigned 64-bit seeds


class _Wire(BaseModel):
    # Strict types, as OpenAI checks them: "max_tokens": "4" or true is a mistake to name, not a 4 or a 1.
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: object) -> object:
        """null for a field that has a default is that default, as OpenAI takes `"n": null` or
        `"stream": null` (clients that serialise every field send them); a required field stays required."""
        if not isinstance(data, dict) or None not in data.values():
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class InputAudio(_Wire):
    data: str  # base64, without a data: prefix
    format: str = "wav"


class InputAudioPart(_Wire):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioUrl(_Wire):
    url: str


class AudioUrlPart(_Wire):
    type: Literal["audio_url"]
    audio_url: AudioUrl


Part = Annotated[TextPart | InputAudioPart | AudioUrlPart, Field(discriminator="type")]


class AssistantAudio(_Wire):
    id: str  # a spoken reply's `audio.id`: the reply stands for its transcript (`api_turn.SPOKEN`)


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    audio: AssistantAudio | None = None  # an assistant turn named by its spoken reply, as OpenAI's clients send it
    tool_calls: list | None = None  # refused (`ChatRequest.refused`): no tool was ever offered to call


class StreamOptions(_Wire):
    include_usage: bool = False


class VoiceId(_Wire):
    id: str  # a custom voice's id (OpenAI's `{"id": "voice_1234"}`)


class AudioOut(_Wire):
    voice: str | VoiceId = "alloy"  # OpenAI's voice names (and custom voices) map to the server's voice
    format: Literal["pcm16", "wav", "mp3", "opus", "flac", "aac"] = "wav"


class ChatRequest(_Wire):
    """A `POST /v1/chat/completions` body."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # None: the model card's greedy decoding, not OpenAI's 1.0. OpenAI's bounds: 0-2, and top_p 0-1 (0: greedy)
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)  # OpenAI's int64; negative ones taken too
    stop: str | list[str] | None = None
    n: int = 1
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOut | None = None  # with modalities ["text", "audio"]: the reply spoken too
    repetition_penalty: float = 1.2  # vLLM's extension; the AF-Next cards use 1.2
    min_tokens: int = Field(default=0, ge=0, le=MAX_NEW_TOKENS)
    ignore_eos: bool = False
    think: bool | None = None  # reason before answering (default: true on the "think" model)
    # OpenAI options this server cannot honour: refused when asked for (`refused`), never dropped
    logprobs: bool = False
    tools: list | None = None
    functions: list | None = None
    tool_choice: object = None
    function_call: object = None  # `functions`' own tool_choice, before tools
    response_format: dict | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    def refused(self) -> tuple[str, str] | None:
        """What this request asks for that the server does not do: (param, one sentence), or None."""
        if self.logprobs:
            return "logprobs", "This server returns no logprobs; leave logprobs out."
        # Tools offered with tool_choice "none" are honoured: the reply is a message and calls none.
        offered = (self.tools and self.tool_choice != "none") or (self.functions and self.function_call != "none")
        if offered or self.tool_choice not in (None, "none", "auto") or any(m.tool_calls for m in self.messages):
            return "tools", ("This server's models call no tools; send the request without tools or functions "
                             "(or with tool_choice \"none\").")
        if self.response_format is not None and self.response_format.get("type") != "text":
            return "response_format", "This server cannot hold replies to a JSON format; leave response_format out."
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"This server does not apply {name}; use repetition_penalty (default 1.2) instead."
        if self.logit_bias:
            return "logit_bias", "This server does not apply logit_bias; leave it out."
        return None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise WireError(400, f"stop takes up to {MAX_STOP_SEQUENCES} non-empty strings of at most "
                                 f"{MAX_STOP_CHARS} characters.", param="stop")
        return stops


class WireError(Exception):
    """A request the API refuses: an HTTP status, one sentence, and OpenAI's error type and code."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def parse_chat(payload: object) -> ChatRequest:
    """The request, or a WireError naming the first field that is wrong."""
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        # The deepest error is the one on the branch the input took (content given as parts: the part's
        # error, not "should be a string"); pydantic's labels of union branches ("str", "list[…]", a
        # part's type before its field of the same name) are left out.
        first = max(exc.errors(), key=lambda e: len(e["loc"]))
        path = [str(p) for p in first["loc"] if p != "str" and "[" not in str(p)]
        where = ".".join(p for i, p in enumerate(path) if i == 0 or p != path[i - 1]) or "body"
        message = first["msg"]
        if first["type"] == "union_tag_invalid":  # an image, a file, a refusal…: a part type we do not take
            message = f"parts of type {first['ctx']['tag']!r} are not supported; a part is one of {first['ctx']['expected_tags']}"
        elif path[-1:] == ["role"] and first["input"] in ("tool", "function"):  # a tool's result: none was called
            message = (f"{first['input']} messages are not supported, as this server's models call no tools; "
                       "a role is one of 'system', 'developer', 'user', 'assistant'")
        raise WireError(400, f"{where}: {message}.", param=where) from None


def audio_base64(part: InputAudioPart | AudioUrlPart) -> str:
    """A part's audio as the base64 text it came in; data: URIs only, never a fetch or a path."""
    if isinstance(part, AudioUrlPart):
        url = part.audio_url.url
        if not url.startswith("data:") or ";base64," not in url[:128]:
            raise WireError(400, "audio_url must be a data: URI with base64 audio; this server fetches no URLs.",
                            param="audio_url")
        return url.split(",", 1)[1]
    if part.input_audio.data.startswith("data:"):
        raise WireError(400, "input_audio.data is base64 without a data: prefix (a data: URI goes in an audio_url "
                             "part).", param="input_audio.data")
    if part.input_audio.format.lower() not in AUDIO_FORMATS:
        raise WireError(400, f"input_audio.format {part.input_audio.format[:20]!r} is not one of "
                             f"{', '.join(AUDIO_FORMATS)}.", param="input_audio.format")
    return part.input_audio.data


def decode_base64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(400, "The audio is not valid base64.", param="input_audio.data") from None


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


AUDIO_OUT_RATE = 24_000  # Hz of reply audio, as OpenAI sends it
AUDIO_KEPT_S = 3600  # `expires_at`: an audio id is only an id here (nothing is stored), an hour as OpenAI's


def pcm16_b64(samples) -> str:
    """float32 [-1, 1] → base64 little-endian pcm16."""
    import numpy as np

    return base64.b64encode((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def encode_audio(samples, fmt: str) -> bytes:
    """A whole reply's 24 kHz float32 speech as a file in `fmt` (pcm16: raw samples)."""
    import io

    import numpy as np

    if len(samples) == 0:  # an empty answer is a valid, silent file of 10 ms (encoders refuse nothing at all)
        samples = np.zeros(AUDIO_OUT_RATE // 100, np.float32)
    if fmt == "pcm16":
        return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    if fmt in ("wav", "flac"):
        import soundfile as sf

        out = io.BytesIO()
        sf.write(out, samples, AUDIO_OUT_RATE, format=fmt.upper(), subtype="PCM_16")
        return out.getvalue()
    return _encode_av(samples, {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac")}[fmt])


def _encode_av(samples, container_codec: tuple[str, str]) -> bytes:
    import io

    import av
    import numpy as np

    container_format, codec = container_codec
    out = io.BytesIO()
    rate = 48_000 if codec == "libopus" else AUDIO_OUT_RATE  # opus runs at 48 kHz
    with av.open(out, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.asarray(samples, np.float32)[None, :], format="flt", layout="mono")
        frame.sample_rate = AUDIO_OUT_RATE
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        for piece in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(piece):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(cid: str, model: str, message: dict, finish: str, use: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish,
                         "logprobs": None}], "usage": use}


def chunk(cid: str, model: str, delta: dict | None, finish: str | None = None, use: dict | None = None, *,
          created: int | None = None, usage: bool = False) -> dict:
    """One streamed chunk: a delta, the finish reason, or (with no choices) the usage. `created`: the
    stream's time (every chunk of a completion carries the same); `usage`: the client asked for it
    (`stream_options.include_usage`), so every chunk has the field, null but in the last."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()) if created is None else created,
            "model": model, "choices": choices}
    if usage or use is not None:
        body["usage"] = use
    return body
