"""The OpenAI-compatible API as its users call it: the official openai SDK against the running app."""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.test_cli import cli, wav
from tests.web.running import free_port, running

KEY = "test-key-123"
TURNS = [("What is this?", 5.0), ("And what comes after it?", None), ("Compare it with this one.", 2.0)]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """`python -m app --model TINY --api-key KEY --requests-per-second 100000`, up once its /health answers."""
    port = str(free_port())
    log = tmp_path_factory.mktemp("api") / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = ["-m", "app", "--model", str(tiny_dir), "--port", port, "--api-key", KEY, "--requests-per-second", "100000"]
    with running(args, log, env=env) as (_, url):
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "v1", api_key=KEY, max_retries=0, timeout=120)


def clips(folder: Path) -> list[str | None]:
    return [None if s is None else wav(folder / f"clip{i}.wav", s, seed=i) for i, (_, s) in enumerate(TURNS)]


def user(text: str, path: str | None) -> dict:
    if path is None:
        return {"role": "user", "content": text}
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                        {"type": "text", "text": text}]}


def converse(client: openai.OpenAI, paths: list[str | None], stream: bool) -> list[tuple[str, object]]:
    """Three turns, each request resending the whole conversation; (answer, usage) per turn."""
    messages, out = [], []
    for (text, _), path in zip(TURNS, paths):
        messages.append(user(text, path))
        if stream:
            chunks = list(client.chat.completions.create(model="instruct", messages=messages, max_tokens=MAX_TOKENS,
                                                          stream=True, stream_options={"include_usage": True}))
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].usage is not None and [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            done = client.chat.completions.create(model="instruct", messages=messages, max_tokens=MAX_TOKENS)
            answer, usage = done.choices[0].message.content, done.usage
        out.append((answer, usage))
        messages.append({"role": "assistant", "content": answer})
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_three_turns_two_clips_equal_the_cli_and_reuse_the_cache(client, tiny_dir, tmp_path, stream):
    paths = clips(tmp_path)
    got = converse(client, paths, stream)
    lines = "".join(json.dumps({"text": text, "audio": path, "max_new_tokens": MAX_TOKENS}) + "\n"
                    for (text, _), path in zip(TURNS, paths))
    proc = cli("chat", "--model", str(tiny_dir), "--jsonl", stdin=lines)
    assert proc.returncode == 0, proc.stderr
    reference = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [answer for answer, _ in got] == [r["answer"] for r in reference]
    assert all(answer for answer, _ in got), "empty replies would prove nothing"
    assert [u.prompt_tokens for _, u in got] == [r["prompt_tokens"] for r in reference]
    cached = [u.prompt_tokens_details.cached_tokens for _, u in got]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    assert cached[2] > cached[1], "each follow-up continues the kept session"


def test_models_and_think(client):
    assert {m.id for m in client.models.list()} == {"instruct", "think"}
    done = client.chat.completions.create(model="think", messages=[{"role": "user", "content": "Why?"}], max_tokens=8)
    message = done.choices[0].message
    assert message.model_extra is not None and "reasoning_content" in message.model_extra
    assert isinstance(message.model_extra["think_steps"], list)


def bad(client: openai.OpenAI, **body) -> openai.APIStatusError:
    body = {"model": "instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**body)
    return caught.value


def test_bad_requests_get_their_code_and_one_sentence(client, server, tmp_path):
    noise = tmp_path / "not-audio.wav"
    noise.write_text("this is not audio")
    cases = [
        (dict(model="gpt-4o"), 404, "does not exist"),
        (dict(temperature=-1), 400, "temperature"),
        (dict(messages=[]), 400, "messages"),
        (dict(messages=[{"role": "assistant", "content": "Hi"}]), 400, "last message"),
        (dict(messages=[user("Hi", str(noise))]), 400, "audio"),
        (dict(messages=[{"role": "user", "content": [{"type": "input_audio",
                                                      "input_audio": {"data": "!!notbase64", "format": "wav"}}]}]),
         400, "base64"),
        (dict(messages=[{"role": "user", "content": [{"type": "audio_url",
                                                      "audio_url": {"url": "http://example.com/a.wav"}}]}]),
         400, "fetches no URLs"),
        (dict(n=2), 400, "n must be 1"),
        (dict(logprobs=True, top_logprobs=3), 400, "no logprobs"),  # options we cannot honour are refused, not dropped
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400, "call no tools"),
        (dict(response_format={"type": "json_object"}), 400, "JSON format"),
        (dict(presence_penalty=0.5), 400, "presence_penalty"),
        (dict(logit_bias={"50256": -100}), 400, "logit_bias"),
        (dict(messages=[{"role": "user", "content": "   "}]), 400, "question"),
        (dict(messages=[{"role": "user", "content": "x" * 40_000}]), 400, "characters long"),
        (dict(messages=[{"role": "user", "content": "Play this <sound> for me"}]), 400, "control tokens"),
        (dict(modalities=["text", "audio"], audio={"voice": "alloy", "format": "mp3"}, stream=True), 400, "pcm16"),
        (dict(modalities=["text", "video"]), 400, "modalities"),
        (dict(stop=["a"] * 5), 400, "stop"),
        (dict(max_tokens="4"), 400, "max_tokens: Input should be a valid integer"),  # types as OpenAI checks them
        (dict(max_tokens=True), 400, "max_tokens"),
        (dict(stream="yes"), 400, "stream"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]),
         400, "messages.0.content.0: parts of type 'image_url' are not supported"),  # not "should be a string"
        (dict(messages=[{"role": "assistant", "content": "x" * 40_000}, {"role": "user", "content": "Hi"}]),
         400, "A reply is 40,000 characters long"),  # not "the question"
    ]
    for body, status, words in cases:
        error = bad(client, **body)
        assert error.status_code == status, (body, error)
        assert words in error.body["message"], (body, error.body)
    no_key = openai.OpenAI(base_url=server + "v1", api_key="wrong", max_retries=0)
    assert bad(no_key).status_code == 401
    lower = httpx.post(server + "v1/chat/completions", headers={"Authorization": f"bearer {KEY}"}, timeout=60,
                       json={"model": "instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert lower.status_code == 200, "the auth scheme is case-insensitive"
    assert lower.headers["x-request-id"].startswith("req_") and lower.headers["x-request-id"] != httpx.get(
        server + "v1/models", headers={"Authorization": f"Bearer {KEY}"}).headers["x-request-id"]
    host, port = server.removeprefix("http://").strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=b"{", headers={"Authorization": f"Bearer {KEY}",
                                                                     "Content-Length": str(200 << 20)})
    answer = conn.getresponse()
    assert answer.status == 413 and "MiB" in json.loads(answer.read())["error"]["message"]
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                 body=b'{"model": "instruct", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}')
    answer = conn.getresponse()
    assert answer.status == 400 and "not valid JSON" in json.loads(answer.read())["error"]["message"]
    with pytest.raises(openai.NotFoundError) as missing:  # an endpoint we do not serve, in OpenAI's shape
        client.embeddings.create(model="instruct", input="Hi")
    assert "no POST /v1/embeddings" in missing.value.body["message"] and "/v1/realtime" in missing.value.body["message"]
    for method, path, status, words in (("GET", "/v1/chat/completions", 405, "takes POST"),
                                        ("DELETE", "/v1/models", 405, "takes GET"),
                                        ("GET", "/v1/realtime", 400, "WebSocket")):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
        answer = conn.getresponse()
        body = json.loads(answer.read())["error"]
        assert answer.status == status and words in body["message"] and body["type"], (path, body)
    ok = client.chat.completions.create(model="instruct", messages=[{"role": "user", "content": "Still there?"}],
                                        max_tokens=3)
    assert ok.choices[0].message.content is not None, "the server answers the next request"


def test_an_agent_may_make_as_many_calls_a_second_as_the_server_allows(server):
    """Past the burst of 120, one address gets 5 calls a second by default; `--requests-per-second`
    raises that (an agent framework calling the API in a loop): 400 calls in a row all answered (here
    with the 400 of a body without messages, which the budget counts like any call)."""
    from app.__main__ import requests_per_second

    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        codes = [http.post(server + "v1/chat/completions", json={"model": "instruct"}).status_code for _ in range(400)]
    assert codes == [400] * 400, sorted(set(codes))
    assert requests_per_second("50") == 50.0
    for bad in ("0", "-1", "nan", "inf", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="requests a second above 0"):
            requests_per_second(bad)


def test_stop_sequences_cut_the_answer(client):
    whole = client.chat.completions.create(model="instruct", messages=[{"role": "user", "content": "Go"}],
                                           max_tokens=16, extra_body={"repetition_penalty": 1.0})
    text = whole.choices[0].message.content
    assert len(text) > 4
    stop = text[3:5]
    cut = client.chat.completions.create(model="instruct", messages=[{"role": "user", "content": "Go"}],
                                         max_tokens=16, stop=[stop], extra_body={"repetition_penalty": 1.0})
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_spoken_answer_cut_by_a_stop_sequence_is_spoken_to_the_stop(client):
    """The stop stops the model, not the voice: all of the answer the client gets is spoken (its last
    piece was spoken with the turn's cancel set, which a voice takes as "say nothing more")."""
    import threading

    from afnext.media import load_audio
    from afnext.tts import load_synthesizer
    from app.api_reply import Voice

    ask = dict(model="instruct", messages=[{"role": "user", "content": "Go"}], max_tokens=24,
               extra_body={"repetition_penalty": 1.0})
    text = client.chat.completions.create(**ask).choices[0].message.content
    stop = text[-6:-3]
    cut = client.chat.completions.create(**ask, stop=[stop], modalities=["text", "audio"],
                                         audio={"voice": "alloy", "format": "wav"})
    said = cut.choices[0].message.audio
    assert said.transcript == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    voice = Voice(load_synthesizer("espeak"), threading.Event())
    expected = sum(len(s) for part in (said.transcript, None) for s in voice.say(part))
    heard = load_audio(base64.b64decode(said.data))  # at 16 kHz
    assert expected > 0.3 * 24_000 and abs(len(heard) - expected * 16 / 24) < 0.05 * 16_000, (len(heard), expected)


def test_a_slow_voice_never_holds_the_answers_text_back():
    """Speech is made on a stage of its own: handing a sentence to a voice that takes 0.3 s a piece
    returns at once, the answer's end returns all of its speech in order, and a client that leaves
    ends the stage."""
    import threading
    import time

    from afnext.events import AudioChunk
    from app.api_reply import Voice

    class Slow:
        sample_rate = 24000

        def stream(self, text, cancel=None):
            time.sleep(0.3)
            yield AudioChunk(24000, np.full(2400, 0.1 * len(text) / 100, np.float32))

    voice = Voice(Slow(), threading.Event())
    started = time.perf_counter()
    early = [*voice.say("The first sentence is here. "), *voice.say("And a second one follows. "),
             *voice.say("Then")]
    assert time.perf_counter() - started < 0.2 and len(early) <= 1, "the text went on without waiting"
    rest = list(voice.say(None))
    spoken = np.concatenate(early + rest)
    assert len(spoken) == 3 * 2400 and not voice._stage.is_alive()
    levels = sorted(set(np.round(spoken, 4).tolist()))
    assert len(levels) == 3, levels  # three pieces, each its own chunk

    gone = threading.Event()
    leaving = Voice(Slow(), gone)
    list(leaving.say("A sentence for nobody. And one more. Then"))
    gone.set()
    leaving._stage.join(2)
    assert not leaving._stage.is_alive(), "the stage of a client that left ends"


def test_audio_url_data_uri_is_audio(client, tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, np.random.default_rng(3).uniform(-0.1, 0.1, 16000), 16000)
    url = "data:audio/flac;base64," + base64.b64encode(path.read_bytes()).decode()
    done = client.chat.completions.create(model="instruct", max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "audio_url", "audio_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}])
    assert done.usage.prompt_tokens > 25, "a 1 s clip adds 25 audio tokens"


def test_the_pool_keeps_sessions_within_its_memory_bound(loaded):
    """Kept conversations are dropped, least recently used first, past the pool's bytes of KV cache."""
    from afnext.engine import Engine
    from afnext.events import TurnDone
    from afnext.pool import Message, SessionPool
    from afnext.sampling import GenerationOptions

    engine = Engine(loaded)
    try:
        pool = SessionPool(engine, max_bytes=1)  # room for one at most
        for text in ("first", "second", "third"):
            lease = pool.lease([])
            reply = [e for e in lease.session.ask(text, options=GenerationOptions(max_new_tokens=2))
                     if isinstance(e, TurnDone)][0].reply
            pool.keep(lease, Message("user", text), reply.answer)
        assert len(pool) == 1 and pool.kept_bytes() > 0
        assert pool.lease([Message("user", "third"), Message("assistant", reply.answer)]).cached_tokens > 0
        assert len(pool) == 0 and pool.kept_bytes() == 0, "a lent session is not counted"
        roomy = SessionPool(engine)  # the running count equals what the kept caches hold
        for text in ("a", "b", "a"):
            lease = roomy.lease([])
            reply = [e for e in lease.session.ask(text, options=GenerationOptions(max_new_tokens=2))
                     if isinstance(e, TurnDone)][0].reply
            roomy.keep(lease, Message("user", text), reply.answer)
        assert len(roomy) == 2 and roomy.kept_bytes() == sum(s.cache_bytes for s in roomy._kept.values()) > 0
    finally:
        engine.close()


def test_history_clips_are_decoded_only_when_no_kept_session_holds_them(loaded):
    from afnext.clip import prepare_clip
    from afnext.engine import Engine
    from afnext.events import TurnDone
    from afnext.pool import Message, SessionPool
    from afnext.sampling import GenerationOptions
    from tests.conftest import noise

    made = []

    def make():
        made.append(1)
        return prepare_clip(noise(2.0), loaded.mel_filters)

    engine = Engine(loaded)
    try:
        pool, options = SessionPool(engine), GenerationOptions(max_new_tokens=3)
        asked = Message("user", "What is it?", make(), "clip-a", make)
        lease = pool.lease([])
        answer = [e for e in lease.session.ask(asked.text, asked.clip, options=options)
                  if isinstance(e, TurnDone)][0].reply.answer
        pool.keep(lease, asked, answer)
        history = [Message("user", "What is it?", None, "clip-a", make), Message("assistant", answer)]
        assert pool.lease(history).cached_tokens > 0 and len(made) == 1, "a kept session holds it: not decoded"
        fresh = SessionPool(engine).lease(history)
        assert len(made) == 2 and fresh.session.tokens.count(loaded.ids.sound) == 50, "rebuilt: decoded once"
    finally:
        engine.close()


def test_a_regenerated_answer_reuses_the_kept_conversation_up_to_where_it_branches(loaded):
    """A client asking the same follow-up again (regenerate) or another one after the same turns gets
    a fork of the kept session: the recording is not computed again, and the kept branch survives."""
    from afnext.clip import prepare_clip
    from afnext.engine import Engine
    from afnext.events import TurnDone
    from afnext.pool import Message, SessionPool
    from afnext.sampling import GenerationOptions
    from tests.conftest import noise

    engine = Engine(loaded)
    try:
        pool, options = SessionPool(engine), GenerationOptions(max_new_tokens=3)
        clip = prepare_clip(noise(4.0), loaded.mel_filters)

        def turn(history, text, clip=None):
            lease = pool.lease(history)
            reply = [e for e in lease.session.ask(text, clip, options=options) if isinstance(e, TurnDone)][0].reply
            pool.keep(lease, Message("user", text, clip, "clip-a" if clip else ""), reply.answer)
            return lease, reply

        _, first = turn([], "What is it?", clip)
        history = [Message("user", "What is it?", None, "clip-a"), Message("assistant", first.answer)]
        lease, follow = turn(history, "And then?")
        again, regenerated = turn(history, "And then?")  # the kept session went on past `history`: forked
        # The fork's cache even holds the end of the first answer, which the first follow-up computed.
        assert again.cached_tokens >= lease.cached_tokens > 100, "the clip came from the kept session's cache"
        assert regenerated.token_ids == follow.token_ids, "greedy: the same answer again"
        longer = history + [Message("user", "And then?"), Message("assistant", follow.answer)]
        assert pool.lease(longer).cached_tokens > lease.cached_tokens, "the first branch is still kept whole"
    finally:
        engine.close()


def test_an_empty_system_prompt_shares_no_other_clients_turns(loaded):
    """An empty system message is no system message (the template's default prompt): the pool must not
    count it as a message the session holds, or the next client's lease is forked one message too far,
    into another client's question (found in review)."""
    from afnext.engine import Engine
    from afnext.events import TurnDone
    from afnext.pool import Message, SessionPool
    from afnext.sampling import GenerationOptions

    engine = Engine(loaded)
    try:
        pool, empty = SessionPool(engine), Message("system", "")
        lease = pool.lease([empty])
        reply = [e for e in lease.session.ask("Alice's private question", options=GenerationOptions(max_new_tokens=3))
                 if isinstance(e, TurnDone)][0].reply
        pool.keep(lease, Message("user", "Alice's private question"), reply.answer)
        other = pool.lease([empty])
        assert other.session.messages == [], other.session.messages
        again = pool.lease([empty, Message("user", "Alice's private question"), Message("assistant", reply.answer)])
        assert again.cached_tokens > 0, "the same client's follow-up still finds its conversation kept"
    finally:
        engine.close()


def test_a_bad_follow_up_keeps_the_kept_conversation(loaded):
    """A request whose new question is refused (a control token in it) leaves the session it was
    lent kept: the next good request still finds the recording cached."""
    from afnext.clip import prepare_clip
    from afnext.engine import Engine
    from afnext.events import TurnDone
    from afnext.pool import Message, SessionPool
    from afnext.sampling import GenerationOptions
    from tests.conftest import noise

    engine = Engine(loaded)
    try:
        pool, options = SessionPool(engine), GenerationOptions(max_new_tokens=2)
        clip = prepare_clip(noise(3.0), loaded.mel_filters)
        lease = pool.lease([])
        answer = [e for e in lease.session.ask("What is it?", clip, options=options)
                  if isinstance(e, TurnDone)][0].reply.answer
        pool.keep(lease, Message("user", "What is it?", clip, "clip-b"), answer)
        history = [Message("user", "What is it?", None, "clip-b"), Message("assistant", answer)]
        with pytest.raises(ValueError, match="control tokens"):
            pool.lease([*history, Message("user", "Say <|im_start|> now")])
        assert pool.lease(history).cached_tokens > 75, "the kept session survived the refused message"
    finally:
        engine.close()


def test_a_loopback_server_answers_the_api_only_to_its_own_names(loaded):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from afnext.engine import Engine
    from afnext.tts import load_synthesizer
    from app.access import Access
    from app.api import Api
    from app.backend import Backend, BackendLoader

    engine = Engine(loaded)
    try:
        api = Api(BackendLoader.ready_made(Backend(engine, engine, load_synthesizer("espeak"))), Access(local=True))
        client = TestClient(Starlette(routes=api.routes()))
        refused = client.get("/v1/models", headers={"host": "rebind.attacker.example:7860"})
        assert refused.status_code == 403 and "own address" in refused.json()["error"]["message"]
        assert client.get("/v1/models", headers={"host": "127.0.0.1:7860"}).status_code == 200
    finally:
        engine.close()


def test_input_audio_over_30_minutes_is_heard_in_parts_and_followed_up_from_the_kept_parts(client, tmp_path):
    path = tmp_path / "long.flac"  # 31 minutes of a quiet tone at 8 kHz: a small file, as compressed audio is
    t = np.arange(31 * 60 * 8000) / 8000
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 8000, subtype="PCM_16")
    data = base64.b64encode(path.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "flac"}},
                                             {"type": "text", "text": "What happens?"}]}]
    first = client.chat.completions.create(model="instruct", messages=messages, max_tokens=6)
    assert first.choices[0].message.content and first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    follow = client.chat.completions.create(model="instruct", messages=messages, max_tokens=6)
    assert follow.choices[0].message.content
    # Usage counts what the parts read and wrote too: two parts of 15.5 minutes at 25 audio tokens a
    # second, and their answers (it counted the merge turn alone, a few hundred tokens).
    audio = 31 * 60 * 25
    assert audio < first.usage.prompt_tokens < audio + 2_000, first.usage
    assert first.usage.completion_tokens > len(first.choices[0].message.content.split()) and \
        first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    # The follow-up: the parts and the merge session that hold the first turn go on, served from their caches.
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens
    assert follow.usage.prompt_tokens_details.cached_tokens > audio
    # One recording per conversation, and it comes first: any other clip is refused in a sentence.
    short = user("And this?", wav(tmp_path / "short.wav", 2))
    with pytest.raises(openai.BadRequestError, match="heard in parts"):
        client.chat.completions.create(model="instruct", max_tokens=6, messages=[
            *messages, {"role": "assistant", "content": follow.choices[0].message.content}, short])
    with pytest.raises(openai.BadRequestError, match="must be the conversation's first clip"):
        client.chat.completions.create(model="instruct", max_tokens=6, messages=[
            short, {"role": "assistant", "content": "A short clip."}, messages[0]])


def test_a_recording_whose_first_turn_failed_is_nobody_elses_next_conversation(loaded):
    from afnext.engine import Engine
    from afnext.pool import Message, PartedPool
    from tests.conftest import noise

    engine = Engine(loaded)
    try:
        pool = PartedPool(engine)
        long = Message("user", "", None, "clip-long", None, lambda: noise(100).tobytes())
        lease = pool.lease([], long)
        with pytest.raises(ValueError):
            lease.session.ask("")  # the first turn fails before anything is heard
        pool.give_back(lease)
        assert pool.lease([], Message("user", "Hello, what is 2+2?")) is None  # not handed the recording
    finally:
        engine.close()


def test_large_bodies_read_at_once_are_held_within_one_budget(loaded, monkeypatch):
    """Several large bodies arriving together: their bytes in all stay within BODIES_MAX_BYTES — the
    requests beyond it get a 503 with a sentence while they are read — and once they are done the
    budget is whole again (a small request is answered)."""
    import asyncio

    import httpx
    from starlette.applications import Starlette

    from afnext.engine import Engine
    from afnext.tts import load_synthesizer
    from app import api
    from app.backend import Backend, BackendLoader

    monkeypatch.setattr(api, "BODIES_MAX_BYTES", 3 << 20)
    backend = Backend(Engine(loaded), Engine(loaded), load_synthesizer("espeak"))
    service = api.Api(BackendLoader.ready_made(backend))
    app = Starlette(routes=service.routes())
    padding = "x" * (1 << 20)

    async def body():  # 1.5 MiB of JSON in pieces, each read while the others are read too
        text = json.dumps({"model": "instruct", "max_tokens": 2, "messages": [
            {"role": "user", "content": "Hi."}], "padding": padding + padding[: 1 << 19]}).encode()
        for i in range(0, len(text), 1 << 16):
            yield text[i:i + (1 << 16)]
            await asyncio.sleep(0.001)

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            sent = await asyncio.gather(*(http.post("/v1/chat/completions", content=body()) for _ in range(6)))
            after = await http.post("/v1/chat/completions", json={"model": "instruct", "max_tokens": 2,
                                                                  "messages": [{"role": "user", "content": "Hi."}]})
        return sent, after

    try:
        sent, after = asyncio.run(run())
    finally:
        backend.close()
    codes = sorted(r.status_code for r in sent)
    assert 503 in codes and codes.count(503) >= 4, codes  # at most two 1.5 MiB bodies fit in 3 MiB
    assert all("reading other large requests" in r.json()["error"]["message"] for r in sent if r.status_code == 503)
    assert after.status_code == 200 and service._reading == 0, after.text


def test_a_server_with_no_voice_refuses_audio_out_in_one_sentence_and_answers_text(engine):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from afnext.tts import Mute
    from app import api
    from app.backend import Backend, BackendLoader

    backend = Backend(engine, engine, Mute("espeak-ng could not load its library."))
    http = TestClient(Starlette(routes=api.Api(BackendLoader.ready_made(backend)).routes()))
    question = {"model": "instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi."}]}
    spoken = http.post("/v1/chat/completions", json={**question, "modalities": ["text", "audio"],
                                                     "audio": {"voice": "alloy", "format": "wav"}})
    assert spoken.status_code == 400 and spoken.json()["error"]["message"] == (
        "This server has no voice (espeak-ng could not load its library), so it answers in text only; leave "
        "\"audio\" out of modalities."), spoken.text
    assert http.post("/v1/chat/completions", json=question).status_code == 200


def test_a_client_leaving_mid_body_is_no_server_error(engine, caplog):
    """A client that hangs up while sending its body has failed nothing of ours: no error logged,
    and the next request is answered."""
    import logging

    with caplog.at_level(logging.INFO, logger="app.api"):
        sent = chat_then_gone(engine, b'{"model": "inst', 1000)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert sent and sent[0]["status"] == 400


def chat_then_gone(engine, body: bytes, length: int | None = None) -> list[dict]:
    """POST /v1/chat/completions straight into the API's ASGI app (uvicorn's Content-Length: `length`, else
    the body's): `body` arrives, then the client is gone. What the app sent back."""
    import asyncio

    from starlette.applications import Starlette

    from afnext.tts import load_synthesizer
    from app import api
    from app.backend import Backend, BackendLoader

    app = Starlette(routes=api.Api(BackendLoader.ready_made(Backend(engine, engine, load_synthesizer("espeak")))).routes())
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body) if length is None else length).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": ""}
    events = iter([{"type": "http.request", "body": body, "more_body": length is not None}])
    sent: list[dict] = []

    async def receive():
        return next(events, {"type": "http.disconnect"})

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_a_turn_larger_than_the_kv_pool_is_a_400_and_the_server_goes_on(loaded):
    """A reply asked for that would not fit the server's KV memory even alone is the client's to
    change: a 400 saying so in one sentence, and the next request is answered."""
    import asyncio

    import httpx
    from starlette.applications import Starlette

    from afnext.engine import Engine
    from afnext.paged import BLOCK_TOKENS
    from afnext.tts import load_synthesizer
    from app import api
    from app.backend import Backend, BackendLoader

    engine = Engine(loaded, kv="paged", kv_pool_tokens=2 * BLOCK_TOKENS)
    backend = Backend(engine, engine, load_synthesizer("espeak"))
    app = Starlette(routes=api.Api(BackendLoader.ready_made(backend)).routes())

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            asks = [{"model": "instruct", "max_tokens": n, "messages": [{"role": "user", "content": "Hi."}]} for n in (2000, 2)]
            return [await http.post("/v1/chat/completions", json=body) for body in asks]

    try:
        big, small = asyncio.run(run())
    finally:
        backend.close()
    assert big.status_code == 400, big.text
    message = big.json()["error"]["message"]
    assert message.startswith("This turn needs room for") and message.endswith("start a new conversation.")
    assert small.status_code == 200 and small.json()["choices"][0]["message"]["content"] is not None


@contextlib.contextmanager
def local_api(loaded):
    """The /v1 routes alone on uvicorn in this process (a real socket), with their own engines:
    yields (port, backend, Api)."""
    import threading
    import time

    import uvicorn
    from starlette.applications import Starlette

    from afnext.engine import Engine
    from afnext.tts import load_synthesizer
    from app import api
    from app.backend import Backend, BackendLoader

    backend = Backend(Engine(loaded), Engine(loaded), load_synthesizer("espeak"))
    service = api.Api(BackendLoader.ready_made(backend))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=service.routes()), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield port, backend, service
    finally:
        server.should_exit = True
        thread.join(10)
        backend.close()


def ask_streamed(port: int, max_tokens: int) -> http.client.HTTPResponse:
    """A streamed chat completion of exactly `max_tokens` tokens; returns once its headers are in."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps({
        "model": "instruct", "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
        "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "Tell me more."}]}),
        {"content-type": "application/json"})
    return connection.getresponse()


def test_a_streamed_reply_is_read_on_the_loop_and_stops_when_its_client_leaves(loaded):
    """A streamed text reply over a real socket (uvicorn): the opening chunk comes with the first
    content, one chunk per delta, the usage and [DONE] last. A client that hangs up mid-reply stops its
    turn within a few steps (the engine runs nothing after), and the next request is answered."""
    import socket
    import time

    with local_api(loaded) as (port, backend, service):
        whole = ask_streamed(port, 6)
        lines = [line for line in whole.read().decode().split("\n\n") if line]
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and whole.status == 200
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
        assert all(deltas[1:-1]) and deltas[-1] is None, "one chunk per text delta, then the finish"
        assert chunks[-1]["usage"]["completion_tokens"] == 6 and not chunks[-1]["choices"]
        assert all(c["usage"] is None for c in chunks[:-1]), "asked for usage: null in every chunk but the last"
        assert len({c["created"] for c in chunks}) == 1 and len({c["id"] for c in chunks}) == 1

        leaving = ask_streamed(port, 4000)  # about four seconds of decoding on the tiny model
        first = leaving.readline()
        assert first.startswith(b"data: {"), first
        leaving.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        leaving.close()
        left = time.monotonic()
        while backend.main.scheduler.running() and time.monotonic() - left < 3:
            time.sleep(0.01)
        assert not backend.main.scheduler.running(), "the turn of a client that left ran on"
        assert ask_streamed(port, 3).read().decode().endswith("data: [DONE]\n\n")
        deadline = time.monotonic() + 5
        while service._turns and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service._turns == 0, "the stream that ended early is still counted"


def post(server: str, **body) -> httpx.Response:
    body = {"model": "instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, **body}
    return httpx.post(server + "v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body, timeout=60)


def test_models_retrieve_names_one_model(client):
    """The SDK's `models.retrieve` (GET /v1/models/{id}) answers for each listed model, 404 for others."""
    assert client.models.retrieve("instruct").id == "instruct" and client.models.retrieve("think").object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found" and "does not exist" in missing.value.body["message"]


def test_null_is_the_default_as_openai_takes_it(server):
    """OpenAI's optional fields are nullable: clients that serialise every field send nulls."""
    nulls = {f: None for f in ("n", "stream", "stream_options", "logprobs", "presence_penalty", "frequency_penalty",
                               "temperature", "top_p", "seed", "stop", "tools", "tool_choice", "response_format",
                               "repetition_penalty", "min_tokens", "ignore_eos", "user", "metadata")}
    answer = post(server, **nulls)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None, answer.text
    assert post(server, messages=None).status_code == 400, "a required field stays required"


def test_sampling_bounds_are_openais_and_each_error_names_its_param(server):
    """temperature 0-2, top_p 0-1 (0 included: greedy), a negative int64 seed taken; errors name their field."""
    greedy = post(server, max_tokens=6).json()["choices"][0]["message"]["content"]
    top_p0 = post(server, max_tokens=6, temperature=1.0, top_p=0).json()
    assert top_p0["choices"][0]["message"]["content"] == greedy, top_p0
    seeded = [post(server, temperature=1.0, seed=-5).json()["choices"][0]["message"]["content"] for _ in range(2)]
    assert seeded[0] == seeded[1]
    for body, param in ((dict(temperature=2.5), "temperature"), (dict(top_p=1.5), "top_p"), (dict(stop=""), "stop"),
                        (dict(repetition_penalty=0), "repetition_penalty"), (dict(seed=2**70), "seed")):
        error = post(server, **body)
        assert error.status_code == 400 and error.json()["error"]["param"] == param, (body, error.text)


def test_tools_with_tool_choice_none_are_honoured_and_tool_turns_refused_in_a_sentence(client, server):
    """tool_choice "none" asks for a message, not a call: answered. A history with tool calls or tool
    results is refused with a sentence, not pydantic's list of roles."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    done = client.chat.completions.create(model="instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          tools=tools, tool_choice="none")
    assert done.choices[0].message.content is not None and not done.choices[0].message.tool_calls
    assert "call no tools" in bad(client, tools=tools).body["message"]
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "42"}
    for history in ([call], [call, result], [result]):
        error = bad(client, messages=[{"role": "user", "content": "Hi"}, *history, {"role": "user", "content": "So?"}])
        assert error.status_code == 400 and "call no tools" in error.body["message"], error.body


def test_a_spoken_reply_is_named_back_by_its_audio_id(client):
    """OpenAI's multi-turn audio: the client sends the spoken reply back as {"audio": {"id"}}; the model
    hears its transcript (the kept session is found by it), in every output format the SDK names (aac,
    a custom voice's {"id"} too). An id this server never gave is refused in a sentence."""
    from afnext.media import load_audio

    question = [{"role": "user", "content": "Hello"}]
    spoken = client.chat.completions.create(model="instruct", messages=question, max_tokens=6,
                                            modalities=["text", "audio"], audio={"voice": {"id": "voice_1"}, "format": "aac"})
    audio = spoken.choices[0].message.audio
    assert audio.transcript and len(load_audio(base64.b64decode(audio.data))) > 0
    follow = [{"role": "user", "content": "And?"}]
    by_id = client.chat.completions.create(model="instruct", max_tokens=3,
                                           messages=[*question, {"role": "assistant", "audio": {"id": audio.id}}, *follow])
    by_text = client.chat.completions.create(model="instruct", max_tokens=3,
                                             messages=[*question, {"role": "assistant", "content": audio.transcript}, *follow])
    assert by_id.usage.prompt_tokens == by_text.usage.prompt_tokens
    assert by_id.usage.prompt_tokens_details.cached_tokens > 0, "the spoken turn's kept session was found"
    error = bad(client, messages=[*question, {"role": "assistant", "audio": {"id": "audio-never"}}, *follow])
    assert error.status_code == 400 and error.body["param"] == "messages.1.audio.id", error.body


def test_input_audio_with_a_data_uri_prefix_is_named(client):
    data = "data:audio/wav;base64," + base64.b64encode(b"RIFF").decode()
    error = bad(client, messages=[{"role": "user", "content": [{"type": "input_audio",
                                                                "input_audio": {"data": data, "format": "wav"}}]}])
    assert error.status_code == 400 and "without a data: prefix" in error.body["message"], error.body


def test_system_and_developer_messages_mid_conversation_stand_where_they_are_sent(client, tiny_dir):
    """Agents change the instructions as a conversation goes on (a developer message before a later
    turn): the model reads each where it stands, as the chat template renders the conversation (a
    400 before), and a follow-up resending it finds its kept session."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello!"},
                {"role": "developer", "content": "From now on, answer in German."},
                {"role": "user", "content": "How are you?"}]
    first = client.chat.completions.create(model="instruct", messages=messages, max_tokens=4)
    rendered = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    prompt = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    assert prompt.count("<|im_start|>system") == 2 and "German" in prompt
    assert first.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    follow = [*messages, {"role": "assistant", "content": first.choices[0].message.content},
              {"role": "system", "content": "Now in French."}, {"role": "user", "content": "And now?"}]
    second = client.chat.completions.create(model="instruct", messages=follow, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2, "the kept session was missed"
