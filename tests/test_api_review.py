"""The Chat Completions endpoint as the openai SDK calls it, at its edges: answers stopped early (a stop
sequence, a client that closes its stream), requests continuing one conversation at once, and odd but
valid requests."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.test_api import local_api

STOPS = ["a", "e", "o", "i"]  # the tiny model's noise holds one of these within a few tokens


@pytest.fixture(scope="module")
def api(loaded):
    """(SDK client, backend) against the /v1 routes on uvicorn in this process."""
    with local_api(loaded) as (port, backend, _):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="any", max_retries=0, timeout=60), backend


def ask(client: openai.OpenAI, messages: list[dict], **options):
    return client.chat.completions.create(model="instruct", messages=messages, **{"max_tokens": 4, **options})


def conversation(client: openai.OpenAI, opening: str) -> list[dict]:
    """A first exchange the server keeps, and a follow-up question."""
    first = [{"role": "user", "content": opening}]
    answer = ask(client, first, max_tokens=6).choices[0].message.content
    return [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "Tell me more."}]


def cached(done) -> int:
    return done.usage.prompt_tokens_details.cached_tokens


def test_an_answer_cut_by_a_stop_sequence_leaves_the_conversation_kept(api):
    """A stop sequence stops the model early; the client's next request, which resends the answer as it
    was cut, continues the kept session (it was dropped: the whole conversation was prefilled again) and
    gets the answer a fresh session on the same messages gets."""
    client, _ = api
    # every reply in it written by the client: the noise the tiny model writes is not the text it decodes to
    messages = [{"role": "user", "content": "Stop here."}, {"role": "assistant", "content": "Where?"},
                {"role": "user", "content": "Just here."}]
    cut = ask(client, messages, max_tokens=24, stop=STOPS, extra_body={"repetition_penalty": 1.0})
    assert cut.choices[0].finish_reason == "stop", cut
    follow = [*messages, {"role": "assistant", "content": cut.choices[0].message.content},
              {"role": "user", "content": "Go on."}]
    done = ask(client, follow)
    # all but the cut reply's header, which is computed again with the reply as it was cut
    assert cached(done) >= cut.usage.prompt_tokens - 8 and cached(done) > cached(cut), done.usage
    # the think model's plain pool holds nothing of this conversation: built afresh from the same text
    fresh = client.chat.completions.create(model="think", messages=follow, max_tokens=4, extra_body={"think": False})
    assert cached(fresh) == 0 and fresh.usage.prompt_tokens == done.usage.prompt_tokens
    assert fresh.choices[0].message.content == done.choices[0].message.content


def test_a_stream_closed_mid_answer_leaves_the_conversation_kept(api):
    """A client that closes its stream mid-answer (a chat page's Stop button) stops the turn; its next
    request — the question asked again, or the partial answer sent back with another — continues the
    kept conversation instead of prefilling it all again."""
    client, backend = api
    messages = conversation(client, "Please go on and on.")
    stream = ask(client, messages, max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    partial = ""
    for n, chunk in enumerate(stream):
        partial += chunk.choices[0].delta.content or "" if chunk.choices else ""
        if n == 4:
            break
    stream.close()
    deadline = time.monotonic() + 3
    while backend.main.scheduler.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not backend.main.scheduler.running(), "the abandoned turn ran on"
    again = ask(client, messages)
    assert cached(again) > 0, again.usage
    goes_on = ask(client, [*messages, {"role": "assistant", "content": partial}, {"role": "user", "content": "Hm?"}])
    assert cached(goes_on) >= again.usage.prompt_tokens - 2, goes_on.usage


def test_requests_continuing_one_conversation_at_once_all_get_its_answer(api):
    """Eight requests at once resend the same history (streamed and whole): each gets the answer one
    request alone gets, whether it continued the kept session or built its own."""
    client, _ = api
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "And then?"}]
    alone = ask(client, messages, max_tokens=8).choices[0].message.content

    def one(i: int) -> str:
        if i % 2:
            chunks = list(ask(client, messages, max_tokens=8, stream=True, stream_options={"include_usage": True}))
            assert chunks[-1].usage.completion_tokens > 0
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return ask(client, messages, max_tokens=8).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [alone] * 8


def test_odd_but_valid_requests_are_answered_or_refused_in_a_sentence(api):
    client, _ = api
    hi = [{"role": "user", "content": "Hi"}]
    answered = [dict(max_completion_tokens=3), dict(temperature=0, seed=7), dict(stop="\n"), dict(stop=[]),
                dict(response_format={"type": "text"}), dict(tool_choice="auto"), dict(logprobs=False),
                dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                               {"role": "user", "content": "b"}]),
                dict(messages=[{"role": "system", "content": "Be brief.", "name": "rules"},
                               {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                                "name": "bob"}]),
                dict(user="u1", metadata={"k": "v"}, store=False, parallel_tool_calls=False)]
    for body in answered:
        done = ask(client, body.pop("messages", hi), **body)
        assert done.choices[0].message.content is not None and len(done.choices) == 1, body
    assert ask(client, hi, max_completion_tokens=3, max_tokens=9).usage.completion_tokens <= 3
    refused = [(dict(n=2), "n"), (dict(logprobs=True), "logprobs"), (dict(tool_choice="required"), "tools"),
               (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
                "response_format"),
               (dict(messages=[{"role": "user", "content": [{"type": "input_audio",
                                                              "input_audio": {"data": "UklGRg==", "format": "xyz"}}]}]),
                "input_audio.format"),
               (dict(messages=[]), "messages"),
               (dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "messages")]
    for body, param in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, body.pop("messages", hi), **body)
        assert caught.value.body["param"] == param and caught.value.body["message"].endswith("."), caught.value.body
    assert ask(client, hi).choices[0].message.content is not None, "the server goes on serving"


def test_a_client_hanging_up_on_a_whole_reply_before_it_begins_logs_no_error(engine, caplog, monkeypatch):
    """A client waiting for a whole (unstreamed) reply hangs up while its turn still waits for the engine:
    the turn is dropped, nothing failed, and the log says so in a line (it logged a traceback as a
    failed chat completion)."""
    import json
    import logging
    import time

    from tests.test_api import chat_then_gone

    submit = engine.submit

    def slow_submit(request):  # the engine busy with others: the turn waits past the client's hang-up
        time.sleep(1.5)  # past the first look (DISCONNECT_POLL_S)
        return submit(request)

    monkeypatch.setattr(engine, "submit", slow_submit)
    body = json.dumps({"model": "instruct", "messages": [{"role": "user", "content": "Hello?"}],
                       "max_tokens": 4}).encode()
    with caplog.at_level(logging.INFO, logger="app.api"):
        chat_then_gone(engine, body)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "left before its reply was done" in caplog.text, caplog.text
