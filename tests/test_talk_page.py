"""The Talk tab's Realtime client (app/static/talk.js) in Debian's Chromium against a scripted
server: the page is served from a stub origin, its WebSocket is a fake the test delivers events
through, so the timing cases of barge-in can be played exactly (the browser tests cover the real
server)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
ORIGIN = "http://localhost:9999"
TALK = ".afn-talk"
# A WebSocket stand-in: records what the page sends; the test delivers server events and closes it.
FAKE_SOCKET = """
window.sent = []; window.sockets = [];
window.WebSocket = class { constructor(url, protocols) { Object.assign(this, {url, protocols, readyState: 1});
  window.sockets.push(this); } send(text) { window.sent.push(JSON.parse(text)); } close() { this.readyState = 3; } };
window.deliver = (event) => window.sockets.at(-1).onmessage({data: JSON.stringify(event)});
window.drop = () => { const s = window.sockets.at(-1); s.readyState = 3; s.onclose({code: 1006, reason: ""}); };
"""


def speech_b64(seconds: float) -> str:
    pcm = (np.sin(np.arange(round(24_000 * seconds)) / 10) * 8000).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode()


@pytest.fixture(scope="module")
def browser():
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required"]
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


OWNER = "0123456789abcdef" * 4
KEPT = {"id": "c1", "kind": "talk", "title": "Voice conversation", "recording": False, "turns": [
    {"role": "user", "text": "", "audio": True, "reasoning": "", "interrupted": False},
    {"role": "assistant", "text": "Hello from before.", "audio": False, "reasoning": "", "interrupted": True}]}


class Page:
    """talk.js on a stub page, started, its socket's session created and one user turn committed.
    `kept`: the page had conversation c1 open before a reload (the server's history answers for it);
    `title`: c1's title in the history list."""

    def __init__(self, browser, kept: bool = False, title: str = "Voice conversation", turns: list | None = None) -> None:
        script = (ROOT / "app/static/talk.js").read_text()
        owner = (ROOT / "app/static/owner.js").read_text()
        html = (f'<!doctype html><script>{owner}</script><div id="host"><div class="afn-talk"></div></div>'
                f'<script>(function (element) {{ {script} }})(document.getElementById("host"));</script>')
        self.title, self.kept = title, {**KEPT, "turns": turns} if turns is not None else KEPT
        self.context = browser.new_context()
        self.history: list[tuple[str, str, dict]] = []  # (method, url, headers) the page asked the history
        self.page = page = self.context.new_page()
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.route(f"{ORIGIN}/", lambda r: r.fulfill(body=html, content_type="text/html"))
        page.route(f"{ORIGIN}/health", lambda r: r.fulfill(body='{"status": "ready"}', content_type="application/json"))
        page.route(f"{ORIGIN}/afnext/token", lambda r: r.fulfill(body='{"token": "1-ab"}', content_type="application/json"))
        page.route(f"{ORIGIN}/afnext/conversations**", self._history)
        page.add_init_script(FAKE_SOCKET)
        page.add_init_script(f"localStorage.setItem('afnext-owner', '{OWNER}');" +
                             ("localStorage.setItem('afnext-open-talk', 'c1');" if kept else ""))
        page.goto(f"{ORIGIN}/")
        if kept:
            page.locator(f"{TALK} .transcript .answer", has_text=self.kept["turns"][-1]["text"]).wait_for()
        page.locator(f"{TALK} .start").click()
        page.wait_for_function("window.sockets.length > 0")
        assert page.evaluate("window.sockets[0].protocols") == ["realtime", "afnext-page-token.1-ab",
                                                                f"afnext-owner.{OWNER}"]
        self.deliver({"type": "session.created", "session": {}, **({"conversation": {"id": "c1", "turns": 1}}
                                                                    if kept else {})})
        page.wait_for_function("window.sent.some(e => e.type === 'input_audio_buffer.append')")
        self.user_turn()

    def _history(self, route) -> None:
        request = route.request
        self.history.append((request.method, request.url, request.headers))
        if request.url.endswith("/afnext/conversations/c1"):
            route.fulfill(json=self.kept)
        elif "/audio/" in request.url:
            route.fulfill(status=404, json={"error": "Not kept here."})
        else:
            route.fulfill(json={"conversations": [{"id": "c1", "kind": "talk", "title": self.title,
                                                   "turns": 1, "created": 0, "updated": 0}], "disk_bytes": 42_000})

    def deliver(self, event: dict) -> None:
        self.page.evaluate("event => window.deliver(event)", event)

    def user_turn(self) -> None:
        self.deliver({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u"})
        self.deliver({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 300, "item_id": "u"})
        self.deliver({"type": "input_audio_buffer.committed", "item_id": "u"})

    def reply(self, rid: str, item: str, seconds: float) -> None:
        self.deliver({"type": "response.created", "response": {"id": rid}})
        self.deliver({"type": "response.output_item.added", "item": {"id": item}})
        self.audio(rid, seconds)

    def audio(self, rid: str, seconds: float) -> None:
        self.deliver({"type": "response.output_audio.delta", "response_id": rid, "delta": speech_b64(seconds)})

    def sent(self, kind: str) -> list[dict]:
        return [e for e in self.page.evaluate("window.sent") if e["type"] == kind]

    def samples(self) -> int:
        return int(self.page.evaluate(f"document.querySelector('{TALK}').dataset.replySamples || 0"))

    def state(self) -> str:
        return self.page.locator(f"{TALK} .state").get_attribute("data-state")

    def close(self) -> None:
        assert not self.errors, self.errors
        self.context.close()


def test_a_truncate_counts_only_what_played_not_the_gaps_between_sentences(browser):
    talk = Page(browser)
    talk.reply("r1", "i1", 1.0)
    talk.page.wait_for_timeout(2000)  # 1 s played, then 1 s of silence: the next sentence was being made
    talk.audio("r1", 1.0)
    talk.page.wait_for_timeout(500)  # half of it played: 1.5 s heard in all
    talk.deliver({"type": "input_audio_buffer.speech_started", "audio_start_ms": 4000, "item_id": "u2"})
    truncate = talk.sent("conversation.item.truncate")
    assert len(truncate) == 1 and truncate[0]["item_id"] == "i1", truncate
    assert 1300 <= truncate[0]["audio_end_ms"] <= 1750, truncate
    talk.close()


def test_a_cut_off_reply_plays_nothing_more_of_what_was_still_on_its_way(browser):
    talk = Page(browser)
    talk.page.locator(f"{TALK} .ptt-mode").check()
    talk.reply("r1", "i1", 3.0)
    talk.page.wait_for_timeout(500)
    talk.page.locator(f"{TALK} .ptt").hover()
    talk.page.mouse.down()  # push-to-talk over the reply
    talk.page.wait_for_timeout(100)
    assert [e["type"] for e in talk.sent("response.cancel")] == ["response.cancel"]
    before = talk.samples()
    talk.audio("r1", 1.0)  # sent before the server took the cancel
    talk.page.wait_for_timeout(200)
    assert talk.samples() == before, "audio of the cancelled reply was played"
    talk.page.mouse.up()
    talk.close()


def test_a_press_too_short_to_hear_says_so_until_a_press_is_heard(browser):
    talk = Page(browser)
    talk.page.locator(f"{TALK} .ptt-mode").check()
    notice = talk.page.locator(f"{TALK} .notice")
    talk.page.locator(f"{TALK} .ptt").hover()
    talk.page.mouse.down()
    talk.page.mouse.up()  # at once: nothing was heard
    notice.filter(has_text="too short to hear").wait_for()
    assert talk.sent("input_audio_buffer.commit") == []
    talk.page.mouse.down()
    talk.page.wait_for_timeout(1200)  # the fake microphone speaks meanwhile
    talk.page.mouse.up()
    talk.page.wait_for_function("window.sent.some(e => e.type === 'input_audio_buffer.commit')")
    assert notice.is_hidden(), "the advice about the short press stayed after a press was heard"
    # Answered once the server has the press's audio: a response.create after a commit it refused would
    # have the assistant go on with nothing said (a greeting, to the server).
    assert talk.sent("response.create") == []
    talk.deliver({"type": "input_audio_buffer.committed", "item_id": "p1"})
    talk.page.wait_for_function("window.sent.some(e => e.type === 'response.create')")
    talk.close()


def test_a_press_whose_commit_is_refused_is_not_taken_for_the_next_one(browser):
    """A commit the server refuses for any reason (here: too many turns waiting) names the press's
    commit (its event_id): that press is dropped, and the next committed turn is the next press, its
    own audio in its row (the page had paired it with the refused press, one behind from then on)."""
    talk = Page(browser)
    talk.page.locator(f"{TALK} .ptt-mode").check()
    held = []
    for seconds in (0.6, 1.6):  # two presses, each heard (the fake microphone speaks meanwhile)
        talk.page.locator(f"{TALK} .ptt").hover()
        talk.page.mouse.down()
        talk.page.wait_for_timeout(round(seconds * 1000))
        talk.page.mouse.up()
        talk.page.wait_for_function(f"window.sent.filter(e => e.type === 'input_audio_buffer.commit').length === "
                                    f"{len(held) + 1}")
        held.append(seconds)
    first, second = talk.sent("input_audio_buffer.commit")
    assert first["event_id"] != second["event_id"]
    talk.deliver({"type": "error", "error": {"type": "invalid_request_error", "code": None, "event_id": first["event_id"],
                                             "message": "16 user items wait to go into the conversation already."}})
    talk.deliver({"type": "input_audio_buffer.committed", "item_id": "p2"})
    talk.page.wait_for_function("window.sent.some(e => e.type === 'response.create')")
    said = talk.page.locator(f"{TALK} li.user .said").last.inner_text()
    shown = float(said.strip("()").split()[0])
    assert shown > 1.2, f"the second press's row shows the first press's audio: {said}"
    talk.close()


def served_cut(text: str, audio_ms: float, heard_ms: int) -> str:
    """What the server keeps of a reply after `conversation.item.truncate`: app/realtime_replies.py
    `heard`'s rule (the share of the audio heard is the share of the transcript kept, cut back to a word)."""
    cut = len(text) if audio_ms <= 0 or heard_ms >= audio_ms else round(len(text) * heard_ms / audio_ms)
    return text[:cut].rsplit(" ", 1)[0] if cut < len(text) else text


def test_speaking_over_a_reply_still_playing_marks_and_cuts_its_row_as_the_server_keeps_it(browser):
    """The reply's text has all come and the reply is done, its audio still plays: the row is cut to
    what was heard, at a word, and marked interrupted, as a reload would show it; the state is the
    user's at once (not "speaking" until the cut-off audio would have ended)."""
    talk = Page(browser)
    text = "One two three four five six seven eight nine ten, and 👋 then some more words to the end."
    talk.deliver({"type": "response.created", "response": {"id": "r1"}})
    talk.deliver({"type": "response.output_item.added", "item": {"id": "i1"}})
    talk.deliver({"type": "response.output_audio_transcript.delta", "response_id": "r1", "delta": text})
    for _ in range(3):  # 3 s of audio in three pieces
        talk.audio("r1", 1.0)
    talk.deliver({"type": "response.done", "response": {"id": "r1", "status": "completed"}})
    talk.page.wait_for_timeout(1200)
    assert talk.state() == "speaking"
    talk.deliver({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5000, "item_id": "u2"})
    assert talk.state() == "listening", "the label still said the cut-off reply was speaking"
    [truncate] = talk.sent("conversation.item.truncate")
    row = talk.page.locator(f"{TALK} .transcript li.assistant").last
    assert "interrupted" in row.get_attribute("class")
    kept = served_cut(text, 3000.0, truncate["audio_end_ms"])
    assert 0 < len(kept) < len(text) and row.locator(".answer").inner_text() == kept
    talk.page.wait_for_timeout(300)  # the timer the done reply set must not bring "speaking" back
    assert talk.state() == "listening"
    talk.close()


def test_speaking_over_a_reply_still_being_made_cuts_its_row_once_it_is_done(browser):
    """Cut off while it is still being made: the text and audio the server sent before it took the
    cancel count, played or not, so the row is cut when the reply is done, as the server cuts it."""
    talk = Page(browser)
    first, rest = "Alpha beta gamma delta epsilon zeta ", "eta theta iota kappa lambda mu nu xi omicron."
    talk.deliver({"type": "response.created", "response": {"id": "r1"}})
    talk.deliver({"type": "response.output_item.added", "item": {"id": "i1"}})
    talk.deliver({"type": "response.output_audio_transcript.delta", "response_id": "r1", "delta": first})
    talk.audio("r1", 2.0)
    talk.page.wait_for_timeout(800)
    talk.deliver({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5000, "item_id": "u2"})
    assert talk.state() == "listening"
    [truncate] = talk.sent("conversation.item.truncate")
    talk.deliver({"type": "response.output_audio_transcript.delta", "response_id": "r1", "delta": rest})
    talk.audio("r1", 1.0)  # on its way before the server took the cancel: never played, but it counts
    talk.deliver({"type": "response.done", "response": {"id": "r1", "status": "cancelled"}})
    row = talk.page.locator(f"{TALK} .transcript li.assistant").last
    assert "interrupted" in row.get_attribute("class")
    assert row.locator(".answer").inner_text() == served_cut(first + rest, 3000.0, truncate["audio_end_ms"])
    talk.close()


def test_speech_while_the_reply_is_thinking_truncates_nothing(browser):
    talk = Page(browser)
    talk.reply("r1", "i1", 0.3)
    talk.deliver({"type": "response.done", "response": {"id": "r1", "status": "completed"}})
    talk.page.wait_for_timeout(700)  # the first reply has played out
    talk.user_turn()  # the next turn: its reply has no audio yet when the user speaks again
    talk.deliver({"type": "response.created", "response": {"id": "r2"}})
    talk.deliver({"type": "input_audio_buffer.speech_started", "audio_start_ms": 5000, "item_id": "u3"})
    assert talk.sent("conversation.item.truncate") == [], "nothing was playing: nothing to truncate"
    talk.close()


def test_after_the_socket_drops_the_page_is_idle_and_the_next_conversation_starts_clean(browser):
    talk = Page(browser)
    talk.reply("r1", "i1", 4.0)
    talk.page.evaluate("window.drop()")
    assert talk.state() == "idle"
    assert "connection to the server closed" in talk.page.locator(f"{TALK} .notice").inner_text()
    talk.page.locator(f"{TALK} .start").click()  # a new socket, a new conversation
    talk.page.wait_for_function("window.sockets.length > 1")
    talk.deliver({"type": "session.created", "session": {}})
    talk.deliver({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u"})
    assert talk.sent("conversation.item.truncate") == [], "no truncate of the dead conversation's reply"
    assert "new conversation" in talk.page.locator(f"{TALK} .notice").inner_text()
    assert json.dumps(talk.sent("session.update"))  # each socket configured its session
    talk.close()


def test_a_reload_shows_the_open_conversation_and_the_socket_goes_on_with_it(browser):
    """The page asks the history for the conversation it had open (with its owner token, never
    another's), shows it, and its socket names it; a dropped socket reconnects to the same one."""
    talk = Page(browser, kept=True)
    assert talk.page.evaluate("String(window.sockets[0].url)").endswith("?model=instruct&conversation=c1")
    assert "interrupted" in talk.page.locator(f"{TALK} .transcript li.assistant").first.get_attribute("class")
    assert talk.page.locator(f"{TALK} .transcript .replay").count() >= 1, "a kept turn's audio can be replayed"
    assert all(headers.get("x-afnext-owner") == OWNER for _, _, headers in talk.history)
    talk.page.locator(f"{TALK} .history summary").click()
    assert "1 turn" in talk.page.locator(f"{TALK} .history li.open").inner_text()
    assert talk.page.locator(f"{TALK} .history .disk").inner_text() == "1 conversation kept, 42 kB of audio on disk."
    talk.page.evaluate("window.drop()")
    talk.page.locator(f"{TALK} .start").click()
    talk.page.wait_for_function("window.sockets.length > 1")
    assert talk.page.evaluate("String(window.sockets[1].url)").endswith("conversation=c1")
    talk.deliver({"type": "session.created", "session": {}, "conversation": {"id": "c1", "turns": 2}})
    assert "new conversation" not in talk.page.locator(f"{TALK} .notice").inner_text()
    talk.page.locator(f"{TALK} .new").click()  # New conversation: the next socket names none
    talk.page.wait_for_function("window.sockets.length > 2")
    assert "conversation=" not in talk.page.evaluate("String(window.sockets[2].url)")
    assert talk.page.evaluate("localStorage.getItem('afnext-open-talk')") in (None, "")
    talk.close()


@pytest.mark.parametrize("title, shown", [("Voice conversation", '"Voice conversation"'),
                                          ("“Hello there, how can I help…”", "“Hello there, how can I help…”")])
def test_deleting_a_conversation_asks_first_and_quotes_its_title_once(browser, title, shown):
    """A title quoted already (a voice conversation's first answer) is not quoted again; Cancel deletes nothing."""
    talk = Page(browser, title=title)
    asked: list[str] = []
    talk.page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    talk.page.locator(f"{TALK} .history summary").click()
    talk.page.locator(f"{TALK} .history li .delete").click()
    talk.page.wait_for_timeout(200)
    assert asked == [f"Delete {shown} and its audio? This cannot be undone."]
    assert not [method for method, _, _ in talk.history if method == "DELETE"]
    talk.close()


def test_each_conversation_s_buttons_and_each_replay_say_which_they_are_for(browser):
    """A screen reader lists buttons by name: "Open, Rename, Delete" once per conversation told nothing apart."""
    talk = Page(browser, kept=True)
    talk.page.locator(f"{TALK} .history summary").click()
    for verb in ("Open", "Rename", "Delete"):
        assert talk.page.get_by_role("button", name=f'{verb} "Voice conversation"').count() == 1, verb
    assert talk.page.get_by_role("button", name="Replay your turn 1").count() == 1  # the kept turn
    assert talk.page.get_by_role("button", name="Replay your turn 2").count() == 1  # the turn said since
    talk.close()


def test_a_long_link_in_a_reply_wraps_on_a_phone_instead_of_running_out_of_sight(browser):
    talk = Page(browser)
    talk.page.set_viewport_size({"width": 375, "height": 700})
    talk.deliver({"type": "response.created", "response": {"id": "r1"}})
    talk.deliver({"type": "response.output_text.delta", "response_id": "r1",
                  "delta": "See https://example.com/" + "a" * 200 + " for more."})
    transcript = talk.page.locator(f"{TALK} .transcript")
    assert transcript.evaluate("(ol) => ol.scrollWidth <= ol.clientWidth"), "the reply's row is wider than the page"
    talk.close()


def test_the_focused_control_has_a_ring_a_keyboard_user_can_see(browser):
    """The browser's own ring is 1 px, lost on the orange Start button: the panel draws a 3 px one."""
    talk = Page(browser)
    talk.page.keyboard.press("Tab")  # a keyboard user: :focus-visible
    width = talk.page.evaluate(f"""() => {{
        const button = document.querySelector('{TALK}').shadowRoot?.querySelector('button:not([hidden])')
                       || document.querySelector('{TALK} button:not([hidden])');
        button.focus();
        return parseFloat(getComputedStyle(button).outlineWidth);
    }}""")
    assert width >= 3, f"the focus ring is {width} px"
    talk.close()


def test_a_conversation_the_assistant_began_shows_no_empty_turn_of_yours(browser):
    """A greeting (Realtime's response.create with nothing to answer) is kept after an empty question:
    the transcript shows the assistant's words first, no blank "You:" row, and the turns after it
    replay the audio kept for them (counted as the server counts them)."""
    greeted = [{"role": "user", "text": "", "audio": False, "reasoning": "", "interrupted": False},
               {"role": "assistant", "text": "Hi, I am listening.", "audio": False, "reasoning": "", "interrupted": False},
               *KEPT["turns"]]
    talk = Page(browser, kept=True, turns=greeted)
    rows = talk.page.locator(f"{TALK} .transcript li")
    assert rows.first.get_attribute("class") == "assistant" and "Hi, I am listening." in rows.first.inner_text()
    assert talk.page.locator(f"{TALK} .transcript li.user").first.locator(".said").inner_text() == "(speech)"
    talk.page.locator(f"{TALK} .transcript .replay").first.click()
    talk.page.locator(f"{TALK} .notice", has_text="could not be played").wait_for()
    assert [url for method, url, _ in talk.history if "/audio/" in url][-1].endswith("/c1/audio/1")
    talk.close()
