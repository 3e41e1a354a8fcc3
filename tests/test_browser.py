"""The web app as a person uses it: Debian's Chromium, headless, driven by Playwright against a
running app (`python -m tests.web.server`: the tiny model; Think mode answers from a script).

Chromium's fake microphone plays a speech file on a loop. Measurements (page interactive, end of
speech → first reply audio in the page, the 30-minute waveform) are printed and written to the JSON
file named by AFNEXT_WEB_REPORT, if set; screenshots go to AFNEXT_SCREENSHOTS (default: a temp dir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.conftest import _folder
from tests.web.running import free_port, running
from tests.web.scripted import SCRIPT

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
REPORT: dict[str, float] = {}
SHOTS = Path(os.environ.get("AFNEXT_SCREENSHOTS") or _folder("afnext-shots-"))  # kept only where asked for
SCRIPTED_ANSWER = SCRIPT.split("</think>\n")[1]
WAVE = "#afn-wave .afn-wave"  # the waveform's shadow host (Playwright's CSS pierces open shadow roots)
TALK = "#afn-talk .afn-talk"
API_KEY = "browser-test-key"  # the browser tests' server protects /v1 with it; the page never has it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    started = time.perf_counter()
    try:
        # With an API key: the page must talk over /v1/realtime without it (its own short-lived token).
        with running(["-m", "tests.web.server", "--port", str(free_port()), "--api-key", API_KEY], log) as (_proc, url):
            REPORT["process_start_to_healthy_s"] = round(time.perf_counter() - started, 2)
            if served := re.search(r"([\d.]+) s after launch", log.read_text()):  # a figure, not a signal
                REPORT["launch_to_serving_s"] = float(served.group(1))
            yield url
    finally:
        print(f"\nweb measurements: {json.dumps(REPORT)}\nscreenshots: {SHOTS}")
        if os.environ.get("AFNEXT_WEB_REPORT"):
            meta = {"command": "AFNEXT_WEB_REPORT=FILE python -m pytest tests/test_browser.py",
                    "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "model": "tiny (random weights)",
                    "voice": "espeak-ng", "browser": "Debian chromium, headless"}
            Path(os.environ["AFNEXT_WEB_REPORT"]).write_text(json.dumps({**meta, **REPORT}, indent=2) + "\n")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    # The fake microphone: the speech sample, then 6 s of silence for the reply to play in, looped.
    mic = tmp_path_factory.mktemp("mic") / "mic.wav"
    speech, rate = soundfile.read(ASSETS / "speech.wav", dtype="int16")
    soundfile.write(mic, np.concatenate([speech, np.zeros(6 * rate, np.int16)]), rate, subtype="PCM_16")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic}", "--autoplay-policy=no-user-gesture-required"]
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


def _page(browser, server, init_script: str | None = None, **context_options):
    context = browser.new_context(**{"viewport": {"width": 1280, "height": 1000}, **context_options})
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    t0 = time.perf_counter()
    page.goto(server)
    page.locator(f"{TALK} .start").wait_for()
    return page, time.perf_counter() - t0, errors


def _open_example(page, label: str) -> None:
    page.get_by_role("tab", name="Recordings").click()
    page.get_by_role("button", name=f"Example: {label}").click()
    page.wait_for_function(f"() => document.querySelector('{WAVE}')?.dataset.duration")


def _ask(page, question: str, think: bool, answers: int) -> None:
    box = page.locator("#afn-think input")
    box.check() if think else box.uncheck()
    page.locator("#afn-question textarea").fill(question)
    page.locator("#afn-ask").click()
    # The question shows with a new status line in one update; only a "Done" after it ends this turn
    # (waiting for "Done" first would take the last turn's line, still on the page, for this one's).
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            f"() => document.querySelectorAll('#afn-chat [data-testid=\"user\"]').length >= {answers}", timeout=60_000)
        page.locator("#afn-status", has_text="Done").wait_for(timeout=60_000)
    except PlaywrightTimeout as exc:  # what the page showed instead, to read in CI's log
        shown = {part: page.locator(part).inner_text() for part in ("#afn-status", "#afn-chat", "#afn-waiting")}
        raise AssertionError(f"question {answers} ({question!r}) did not end; the page showed {shown}") from exc


def test_recordings_think_steps_seek_the_audio_and_follow_ups_work(browser, server):
    page, interactive_s, errors = _page(browser, server)
    REPORT["page_load_to_interactive_s"] = round(interactive_s, 2)
    page.get_by_role("tab", name="Recordings").click()
    t0 = time.perf_counter()
    page.locator("#afn-upload input[type=file]").set_input_files(str(ASSETS / "speech.wav"))
    page.wait_for_function(f"() => document.querySelector('{WAVE}')?.dataset.duration")
    REPORT["upload_10s_to_waveform_s"] = round(time.perf_counter() - t0, 2)
    # 10.6 s long: the status line and the waveform's clock both say 0:10, as a player would
    page.locator("#afn-status", has_text="speech.wav (0:10)").wait_for()
    assert page.locator(f"{WAVE} .time").inner_text() == "0:00 / 0:10"
    _ask(page, "What is this recording?", True, 1)
    rows = page.locator(f"{WAVE} li[data-step]")
    rows.nth(2).wait_for()
    assert rows.count() == 3 and page.locator(f"{WAVE} .marker").count() == 3
    assert SCRIPTED_ANSWER in page.locator("#afn-chat").inner_text()
    # to the tenth the model gave: "0.3s to 3.6s" floored to the second would read 0:00–0:03
    assert page.locator(f"{WAVE} li[data-step] .at").all_inner_texts() == ["0:00.3–0:03.6", "0:04.0–0:06.9",
                                                                           "0:07.3–0:10.2"]

    rows.nth(1).click()  # "… from 4.0s to 6.9s": the recording plays from 4.0 s
    page.wait_for_function(f"() => document.querySelector('{WAVE}').dataset.activeStep === '1'")
    current = page.evaluate(f"document.querySelector('{WAVE}').shadowRoot.querySelector('audio').currentTime")
    assert 4.0 <= current < 6.9
    assert "active" in page.locator(f"{WAVE} .marker[data-step='1']").get_attribute("class")
    assert "active" in rows.nth(1).get_attribute("class")

    page.locator(f"{WAVE} .marker[data-step='2']").click()  # the markers seek too
    page.wait_for_function(f"() => document.querySelector('{WAVE}').dataset.activeStep === '2'")

    _ask(page, "When does the request come?", True, 2)  # the follow-up: no second listen
    assert "encoder" not in page.locator("#afn-status").inner_text()
    page.screenshot(path=SHOTS / "recordings.png", full_page=True)

    page.locator("#afn-speak").click()  # the answer, spoken
    page.locator("#afn-spoken [data-testid='download-link']").wait_for()
    assert page.locator("#afn-spoken [data-testid='download-link']").get_attribute("href").endswith(".wav")
    assert not errors, errors
    page.context.close()


def test_a_recording_survives_a_reload_and_a_crash_and_its_conversation_goes_on(browser, tmp_path):
    """The open recording comes back on a reload; after a SIGKILL and a restart on the same store, the
    question already answered is there and the next one is answered too."""
    args = ["-m", "tests.web.server", "--port", str(free_port()), "--data", str(tmp_path / "store")]
    with running(args, tmp_path / "first.log") as (proc, url):
        page, _, errors = _page(browser, url)
        _open_example(page, "Speech (10 s)")
        _ask(page, "What is this recording?", False, 1)
        page.reload()
        page.get_by_role("tab", name="Recordings").click()
        page.locator("#afn-status", has_text="1 question so far").wait_for(timeout=60_000)
        assert "What is this recording?" in page.locator("#afn-chat").inner_text()
        assert "speech.wav" in page.locator(f"{WAVE} .name").inner_text()
        proc.send_signal(signal.SIGKILL)  # a crash: nothing is saved on the way out
        proc.wait(10)
    with running(args, tmp_path / "second.log"):
        page.reload()
        page.get_by_role("tab", name="Recordings").click()
        page.locator("#afn-status", has_text="1 question so far").wait_for(timeout=60_000)
        _ask(page, "And who speaks?", True, 2)
        chat = page.locator("#afn-chat").inner_text()
        assert "What is this recording?" in chat and SCRIPTED_ANSWER in chat
        assert page.locator(f"{WAVE} li[data-step]").count() == 3, "the Think steps of the new answer"
        page.locator("#afn-history input").click()
        page.get_by_role("option", name=re.compile(r"speech\.wav · 2 questions · ")).click()
        page.locator("#afn-disk", has_text="1 recording kept, ").wait_for(timeout=30_000)  # (Gradio's timer may lead it)
        page.screenshot(path=SHOTS / "recordings-after-restart.png", full_page=True)
        page.locator("#afn-title textarea, #afn-title input").first.fill("Shopping note")
        page.locator("#afn-rename").click()
        page.locator("#afn-history input").click()
        page.get_by_role("option", name=re.compile("Shopping note · 2 questions · ")).wait_for(timeout=10_000)
        page.keyboard.press("Escape")
        page.once("dialog", lambda dialog: dialog.accept())  # "Delete …? This cannot be undone."
        page.locator("#afn-delete").click()
        page.locator("#afn-status", has_text="Deleted").wait_for(timeout=10_000)
        assert page.locator('#afn-chat [data-testid="user"]').count() == 0, "the open recording was the one deleted"
        page.reload()
        page.get_by_role("tab", name="Recordings").click()
        page.locator("#afn-disk", has_text="No recordings kept yet.").wait_for(timeout=30_000)
    assert not errors, errors
    page.context.close()


def test_talk_hears_the_microphone_and_the_reply_reaches_the_page(browser, server):
    page, _, errors = _page(browser, server)
    page.locator("#afn-banner", has_text="Think mode answers from a fixed script").wait_for()
    page.locator(f"{TALK} .start").click()
    # Audio played and an answer's words shown, seen together: the looped speech may barge in on the first
    # reply before any of it was heard, and then its row is rightly cut to nothing (a later loop answers).
    page.wait_for_function(f"""() => {{
        const talk = document.querySelector('{TALK}');
        const answers = Array.from(talk.shadowRoot.querySelectorAll('li.assistant .answer'));
        return Number(talk.dataset.replySamples || 0) > 0 && answers.some((a) => a.textContent.trim());
    }}""", timeout=60_000)
    assert page.locator(f"{TALK} li.user").count() >= 1
    first_audio_ms = float(page.evaluate(f"document.querySelector('{TALK}').dataset.firstAudioMs"))
    REPORT["talk_end_of_speech_to_first_audio_in_page_s"] = round(first_audio_ms / 1000, 3)
    page.locator(f"{TALK} .latency", has_text="first audio in this page").wait_for(timeout=30_000)
    assert page.locator(f"{TALK} .state").get_attribute("data-state") in {"listening", "thinking", "speaking"}
    page.screenshot(path=SHOTS / "talk.png", full_page=True)

    turns = page.locator(f"{TALK} li.user").count()  # push-to-talk: the held stretch is one turn
    page.locator(f"{TALK} .ptt-mode").check()
    page.locator(f"{TALK} .ptt").hover()
    page.mouse.down()
    page.wait_for_timeout(1200)
    page.mouse.up()
    page.wait_for_function(f"() => {_count(TALK, 'li.user')} > {turns}")
    held = page.locator(f"{TALK} li.user .said").last.inner_text()
    assert 1.0 <= float(held.strip("()").split()[0]) <= 1.6, held
    page.locator(f"{TALK} .ptt-mode").uncheck()

    page.locator(f"{TALK} .start").click()  # stop
    assert page.locator(f"{TALK} .state").get_attribute("data-state") == "idle"
    users, replies = (page.locator(f"{TALK} {row}").count() for row in ("li.user", "li.assistant"))
    page.locator(f"{TALK} .start").click()  # and on again: the same conversation, new rows for new turns
    page.wait_for_function(f"() => {_count(TALK, 'li.assistant')} > {replies}", timeout=60_000)
    assert page.locator(f"{TALK} li.user").count() > users
    assert not errors, errors
    html = page.content() + "".join(page.evaluate("[...document.scripts].map(s => s.textContent)"))
    assert API_KEY not in html, "the page must never hold the API key"

    page.locator(f"{TALK} .start").click()  # stop, then reload: the conversation is kept and shown again
    # A turn the microphone sent just before the stop is still answered and played to its end before the
    # page is idle: up to 256 tokens of the random model's text read aloud (a suite run on a loaded
    # machine waited over 30 s here).
    page.wait_for_function(f"() => document.querySelector('{TALK}').shadowRoot.querySelector('.state').dataset.state"
                           " === 'idle'", timeout=120_000)
    def shown(texts: list[str]) -> list[str]:  # the random model writes runs of spaces the page collapses
        return [squeezed for t in texts if (squeezed := "".join(t.split()))]

    said = shown(page.locator(f"{TALK} li.assistant .answer").all_inner_texts())
    page.reload()
    page.locator(f"{TALK} li.assistant .answer").first.wait_for(timeout=30_000)
    kept = shown(page.locator(f"{TALK} li.assistant .answer").all_inner_texts())
    # The conversation shown again is this one: its replies are those the page showed (the part heard
    # before the user spoke over one, or a cut-off one as far as the model got). A reply cut off before
    # the page showed any of it is kept too, as far as the model got, so not every kept one was shown.
    assert kept and any(s.startswith(k) or k.startswith(s) for s in said for k in kept), (kept, said)
    page.locator(f"{TALK} .history summary").click()
    page.locator(f"{TALK} .history li.open", has_text="turn").wait_for(timeout=30_000)
    page.locator(f"{TALK} li.user .replay").first.click()  # a kept turn replays from the server's audio
    page.wait_for_timeout(500)
    assert "could not be played" not in page.locator(f"{TALK} .notice").inner_text()
    page.screenshot(path=SHOTS / "talk-after-reload.png", full_page=True)
    assert not errors, errors
    page.context.close()


def test_a_blocked_microphone_gets_a_sentence_saying_how_to_fix_it(browser, server):
    deny = ("navigator.mediaDevices.getUserMedia = () => "
            "Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));")
    page, _, errors = _page(browser, server, init_script=deny)
    page.locator(f"{TALK} .start").click()
    page.locator(f"{TALK} .notice", has_text="The browser blocked the microphone").wait_for()
    assert page.locator(f"{TALK} .state").get_attribute("data-state") == "idle"
    assert page.locator(f"{TALK} .start").inner_text() == "Start talking"
    assert not errors, errors
    page.context.close()


def _count(host: str, selector: str) -> str:
    """JS for the number of `selector` matches inside `host`'s shadow root (document queries stop at it)."""
    return f"document.querySelector('{host}').shadowRoot.querySelectorAll('{selector}').length"


def test_gradios_progress_timer_never_covers_the_status_line(browser, server):
    """The status line says in words what is happening ("Listening to the recording…"): Gradio's own
    timer ("queue: 1/1 | 0.2s", "processing | 1.3s") went over it, and over the question box, at every
    open and question. It goes on the waveform and the chat now."""
    page, _, errors = _page(browser, server)
    page.evaluate("""() => { window.covered = [];
        new MutationObserver(() => { for (const id of ['afn-status', 'afn-question', 'afn-waiting']) {
            for (const wrap of document.getElementById(id)?.querySelectorAll('.wrap') || []) {
                const text = wrap.innerText.trim();
                if (text && !wrap.classList.contains('hide')) window.covered.push(`${id}: ${text}`);
            } } }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
    }""")
    _open_example(page, "Speech (10 s)")
    _ask(page, "What is said?", think=False, answers=1)
    assert page.evaluate("window.covered") == []
    assert not errors, errors
    page.context.close()


def test_enter_and_clicks_at_once_send_one_question(browser, server):
    """Enter with a click on Ask, and a double click, send the question once; no false "type a
    question" warning follows the answer."""
    page, _, errors = _page(browser, server)
    _open_example(page, "Speech (10 s)")
    box, ask = page.locator("#afn-question textarea"), page.locator("#afn-ask")
    box.fill("Sent once?")
    box.press("Enter")
    ask.click()
    ask.dblclick()
    page.locator("#afn-status", has_text="Done").wait_for(timeout=60_000)
    time.sleep(2)  # what a second event would have brought by now
    users = page.locator('#afn-chat [data-testid="user"]')
    assert users.count() == 1 and users.inner_text().strip() == "Sent once?"
    assert page.locator("#afn-status").inner_text().startswith("Done")
    assert "Type a question" not in page.content()
    assert not errors, errors
    page.context.close()


def _focused(page) -> dict:
    """The element focused inside the waveform: its class, role and accessible name."""
    return page.evaluate(f"""() => {{ const el = document.querySelector('{WAVE}').shadowRoot.activeElement;
        return el ? {{cls: el.className, role: el.getAttribute('role'), label: el.getAttribute('aria-label'),
                      step: el.dataset.step ?? null}} : {{}}; }}""")


def _audio_time(page) -> float:
    return page.evaluate(f"document.querySelector('{WAVE}').shadowRoot.querySelector('audio').currentTime")


def test_the_waveform_and_its_steps_work_from_the_keyboard(browser, server):
    """Tab goes Play → the track (a slider: arrows seek) → each step's marker → each step's row; Enter or
    Space on a step plays from it, as a click does."""
    page, _, errors = _page(browser, server)
    _open_example(page, "Speech (10 s)")
    _ask(page, "What is this recording?", True, 1)
    page.locator(f"{WAVE} li[data-step]").nth(2).wait_for()
    page.locator(f"{WAVE} .play").focus()
    page.keyboard.press("Tab")
    assert _focused(page)["role"] == "slider"
    page.keyboard.press("ArrowRight")  # 5 s on
    page.wait_for_function(f"() => document.querySelector('{WAVE}').dataset.activeStep === '1'")
    assert abs(_audio_time(page) - 5.0) < 0.01
    page.keyboard.press("Home")
    assert _audio_time(page) == 0
    for kind in ("marker", "marker", "marker", "", "", ""):  # the rows are plain <li>s
        page.keyboard.press("Tab")
        assert _focused(page)["cls"].split() == ([kind] if kind else []) and _focused(page)["role"] == "button"
    page.keyboard.press("Shift+Tab")  # back to the second row: "… from 4.0s to 6.9s"
    focused = _focused(page)
    assert focused["step"] == "1" and focused["label"] == (
        "Play from the step 0:04.0 to 0:06.9: The note was recorded on Tuesday morning, from 4.0s to 6.9s.")
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.querySelector('{WAVE}').dataset.activeStep === '1'")
    assert 4.0 <= _audio_time(page) < 6.9
    page.keyboard.press("Shift+Tab")  # a marker this time (the last), with Space
    page.keyboard.press("Shift+Tab")
    focused = _focused(page)
    assert "marker" in focused["cls"].split() and focused["role"] == "button" and focused["step"] == "2"
    assert focused["label"] == (
        "Play from the step 0:07.3 to 0:10.2: The request to buy milk and eggs comes at 7.3s to 10.2s.")
    page.keyboard.press(" ")
    page.wait_for_function(f"() => document.querySelector('{WAVE}').dataset.activeStep === '2'")
    assert 7.3 <= _audio_time(page) < 10.2
    assert not errors, errors
    page.context.close()


def test_the_recordings_list_counts_in_words_and_writes_dates_as_the_talk_tab_does(browser, server):
    """"1 question", "1 recording kept"; and when it was last used as the Talk tab's list writes it: in
    this browser's language and time zone (here German, in India)."""
    page, _, errors = _page(browser, server, locale="de-DE", timezone_id="Asia/Kolkata")
    page.get_by_role("tab", name="Recordings").click()
    page.locator("#afn-disk", has_text="No recordings kept yet.").wait_for(timeout=30_000)
    _open_example(page, "Speech (10 s)")
    _ask(page, "How is the date written?", False, 1)
    page.wait_for_function("() => document.querySelector('#afn-history input').value.includes('1 question ·')")
    talk_tab_writes = page.evaluate("""async () => {  // as app/static/talk.js writes a conversation's date
        const answer = await fetch('afnext/conversations?kind=recording', {headers: afnextOwner.headers()});
        const listed = await answer.json();
        return new Date(listed.conversations[0].updated * 1000)
            .toLocaleString([], { dateStyle: "short", timeStyle: "short" });
    }""")
    assert re.fullmatch(r"\d\d\.\d\d\.\d\d, \d\d:\d\d", talk_tab_writes), talk_tab_writes  # German, 24 h
    assert page.locator("#afn-history input").input_value() == f"speech.wav · 1 question · {talk_tab_writes}"
    page.locator("#afn-disk", has_text="1 recording kept, ").wait_for(timeout=30_000)
    assert not errors, errors
    page.context.close()


def test_speak_the_answer_with_no_answer_yet_says_so(browser, server):
    page, _, errors = _page(browser, server)
    _open_example(page, "Speech (10 s)")
    page.locator("#afn-speak").click()
    page.locator("#afn-status", has_text="There is no answer to speak yet; ask a question first.").wait_for()
    assert not errors, errors
    page.context.close()


def test_the_think_box_is_kept_across_a_reload(browser, server):
    page, _, errors = _page(browser, server)
    for on in (True, False):
        page.get_by_role("tab", name="Recordings").click()
        box = page.locator("#afn-think input")
        box.check() if on else box.uncheck()
        page.reload()
        page.get_by_role("tab", name="Recordings").click()
        page.wait_for_function(f"() => document.querySelector('#afn-think input').checked === {str(on).lower()}")
    assert not errors, errors
    page.context.close()


def test_a_question_asked_while_an_answer_streams_is_sent_when_it_is_done(browser, tmp_path):
    """Enter during an answer: the page says the question waits, keeps it in the box, and sends it once the
    answer is done (Think steps slowed to 50 ms a token, so the answer takes seconds)."""
    args = ["-m", "tests.web.server", "--port", str(free_port()), "--step-delay-s", "0.05"]
    with running(args, tmp_path / "server.log") as (_proc, url):
        page, _, errors = _page(browser, url)
        _open_example(page, "Speech (10 s)")
        page.locator("#afn-think input").check()
        box = page.locator("#afn-question textarea")
        box.fill("What is this recording?")
        box.press("Enter")
        page.locator("#afn-status", has_text="Reasoning").wait_for(timeout=60_000)
        box.fill("And who speaks?")
        box.press("Enter")
        page.locator("#afn-waiting", has_text="Your question is sent when this answer is done.").wait_for(timeout=2_000)
        assert box.input_value() == "And who speaks?"
        assert "Reasoning" in page.locator("#afn-status").inner_text(), "the first answer was still streaming"
        users = page.locator('#afn-chat [data-testid="user"]')
        page.wait_for_function("() => document.querySelectorAll('#afn-chat [data-testid=\"user\"]').length === 2",
                               timeout=60_000)
        assert [u.strip() for u in users.all_inner_texts()] == ["What is this recording?", "And who speaks?"]
        assert "sent when this answer is done" not in page.locator("#afn-waiting").inner_text()
        page.locator("#afn-status", has_text="Done").wait_for(timeout=60_000)
        page.wait_for_function("answer => [...document.querySelectorAll('#afn-chat [data-testid=bot]')]"
                               ".filter(m => m.innerText.trim() === answer).length === 2", arg=SCRIPTED_ANSWER)
        assert box.input_value() == ""
        assert not errors, errors
        page.context.close()


def test_two_browsers_see_only_their_own_conversations(browser, server):
    """Not in the page, not in the history list, not by guessing an id (the other's open recording
    planted in this browser's storage), not by replaying the other's request with its id."""
    import httpx

    (a, _, _), (b, _, _) = _page(browser, server), _page(browser, server)
    _open_example(a, "Speech (10 s)")
    _open_example(b, "Sounds (13 s)")
    _ask(a, "Question from the first browser?", False, 1)
    _ask(b, "Question from the second browser?", False, 1)
    chat_a, chat_b = a.locator("#afn-chat").inner_text(), b.locator("#afn-chat").inner_text()
    assert "first browser" in chat_a and "second browser" not in chat_a
    assert "second browser" in chat_b and "first browser" not in chat_b
    assert "speech.wav" in a.locator(f"{WAVE} .name").inner_text()
    assert "sounds.flac" in b.locator(f"{WAVE} .name").inner_text()
    owner_a, cid_a = a.evaluate("[afnextOwner.token(), afnextOwner.recalled('recording')]")
    owner_b = b.evaluate("afnextOwner.token()")
    assert owner_a != owner_b and cid_a
    for owner, sees in ((owner_a, True), (owner_b, False)):
        listed = httpx.get(f"{server}afnext/conversations?kind=recording", headers={"X-AFNext-Owner": owner}).json()
        assert (cid_a in [c["id"] for c in listed["conversations"]]) is sees
        one = httpx.get(f"{server}afnext/conversations/{cid_a}", headers={"X-AFNext-Owner": owner})
        assert one.status_code == (200 if sees else 404)
        audio = httpx.get(f"{server}afnext/conversations/{cid_a}/audio/recording", headers={"X-AFNext-Owner": owner})
        assert audio.status_code == (200 if sees else 404)
    assert httpx.get(f"{server}afnext/conversations/{cid_a}").status_code == 401, "no owner token, nothing"
    assert httpx.delete(f"{server}afnext/conversations/{cid_a}", headers={"X-AFNext-Owner": owner_b}).status_code == 404
    b.evaluate(f"afnextOwner.remember('recording', '{cid_a}')")  # b guesses a's id and reloads
    b.reload()
    b.get_by_role("tab", name="Recordings").click()
    b.locator("#afn-status", has_text="no longer in your history").wait_for(timeout=30_000)
    assert "first browser" not in b.locator("#afn-chat").inner_text()
    b.locator("#afn-history input").click()
    b.get_by_role("option", name=re.compile("sounds")).wait_for(timeout=10_000)
    assert b.get_by_role("option", name=re.compile("speech")).count() == 0
    a.context.close()
    b.context.close()


def test_a_refused_file_leaves_the_upload_box_empty_and_the_next_file_opens(browser, server, tmp_path):
    page, _, errors = _page(browser, server)
    page.get_by_role("tab", name="Recordings").click()
    fake = tmp_path / "notes.wav"
    fake.write_text("just some text, not audio\n")
    box = page.locator("#afn-upload")
    box.locator("input[type=file]").set_input_files(str(fake))
    page.locator("#afn-status", has_text="not audio in a known format").wait_for()
    # the box shows no file that is not open: emptied for the next drop (it shows a name as "notes" ".wav")
    page.wait_for_function("() => !document.querySelector('#afn-upload').innerText.includes('notes')")
    box.locator("input[type=file]").set_input_files(str(ASSETS / "speech.wav"))
    page.locator("#afn-status", has_text="speech.wav (0:10)").wait_for()
    assert "speech" in box.inner_text()  # an opened file stays in the box
    assert not errors, errors
    page.context.close()


def test_a_refused_file_leaves_the_open_recording_and_its_questions_as_they_were(browser, server, tmp_path):
    page, _, errors = _page(browser, server)
    _open_example(page, "Speech (10 s)")
    _ask(page, "Still open after a bad drop?", False, 1)
    fake = tmp_path / "notes.wav"
    fake.write_text("just some text, not audio\n")
    page.locator("#afn-upload input[type=file]").set_input_files(str(fake))
    page.locator("#afn-status", has_text="not audio in a known format").wait_for()
    assert "notes.wav was not opened" in page.locator("#afn-status").inner_text(), "the line names the file refused"
    page.wait_for_function("() => !document.querySelector('#afn-upload').innerText.includes('notes')")
    assert page.locator(f"{WAVE} .wave").is_visible() and "speech.wav" in page.locator(f"{WAVE} .name").inner_text()
    assert "Still open after a bad drop?" in page.locator("#afn-chat").inner_text()
    _ask(page, "And a follow-up?", False, 2)  # the recording is still the server's too
    assert page.locator('#afn-chat [data-testid="user"]').count() == 2
    assert not errors, errors
    page.context.close()


def test_the_chat_has_no_clear_button_that_would_only_hide_the_conversation(browser, server):
    """Gradio's Clear empties the screen only (the next answer brings the conversation back): hidden."""
    page, _, errors = _page(browser, server)
    _open_example(page, "Speech (10 s)")
    _ask(page, "Is there a clear button?", False, 1)
    assert page.locator("#afn-chat button[aria-label='Copy conversation']").is_visible(), "the toolbar is there"
    assert page.locator("#afn-chat button[aria-label='Clear']").is_hidden()
    assert not errors, errors
    page.context.close()


def test_deleting_a_recording_asks_first_and_cancel_keeps_it(browser, server):
    page, _, errors = _page(browser, server)
    _open_example(page, "Speech (10 s)")
    _ask(page, "Kept after a cancel?", False, 1)
    page.wait_for_function("() => document.querySelector('#afn-history input').value.includes('1 question')")
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.locator("#afn-delete").click()
    page.wait_for_timeout(1500)  # what a delete would have shown by now
    assert asked == ['Delete "speech.wav" and its audio? This cannot be undone.']
    assert "Deleted" not in page.locator("#afn-status").inner_text()
    assert "Kept after a cancel?" in page.locator("#afn-chat").inner_text()
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#afn-delete").click()
    page.locator("#afn-status", has_text="Deleted").wait_for(timeout=10_000)
    assert page.locator('#afn-chat [data-testid="user"]').count() == 0
    assert not errors, errors
    page.context.close()


def test_a_clip_under_a_second_shows_its_length_in_seconds(browser, server, tmp_path):
    clip = tmp_path / "blip.wav"
    soundfile.write(clip, (0.3 * np.sin(np.arange(3200) / 5)).astype(np.float32), 16000, subtype="PCM_16")  # 0.2 s
    page, _, errors = _page(browser, server)
    page.get_by_role("tab", name="Recordings").click()
    page.locator("#afn-upload input[type=file]").set_input_files(str(clip))
    page.locator("#afn-status", has_text="blip.wav (0.2 s)").wait_for()
    assert page.locator(f"{WAVE} .time").inner_text() == "0 s / 0.2 s"
    assert not errors, errors
    page.context.close()


def test_a_step_at_the_clips_very_end_is_drawn_inside_the_waveform(browser, server, tmp_path):
    """The script's last step, 7.3 s to 10.2 s, is past the end of a 5 s clip: it becomes the end, a
    single moment, whose marker (6 px wide at least) must stay inside the track rather than stick out."""
    clip = tmp_path / "five.wav"
    soundfile.write(clip, (0.3 * np.sin(np.arange(5 * 16000) / 5)).astype(np.float32), 16000, subtype="PCM_16")
    page, _, errors = _page(browser, server)
    page.get_by_role("tab", name="Recordings").click()
    page.locator("#afn-upload input[type=file]").set_input_files(str(clip))
    page.locator("#afn-status", has_text="five.wav (0:05)").wait_for()
    _ask(page, "What is this recording?", True, 1)
    page.locator(f"{WAVE} li[data-step='2']").wait_for()
    assert page.locator(f"{WAVE} li[data-step='2'] .at").inner_text() == "0:05.0"
    boxes = page.evaluate(f"""() => {{
        const root = document.querySelector('{WAVE}').shadowRoot, box = (el) => el.getBoundingClientRect();
        return {{track: box(root.querySelector('.track')).right,
                 markers: [...root.querySelectorAll('.marker')].map((m) => [box(m).left, box(m).right])}};
    }}""")
    last_left, last_right = boxes["markers"][2]
    assert last_right <= boxes["track"] + 0.5 and last_right - last_left >= 5, boxes
    assert not errors, errors
    page.context.close()


def test_the_upload_box_shows_a_file_only_while_it_is_the_open_recording(browser, server):
    """An upload stays in the box while it is open; opening an example, or the upload again from the
    history, empties the box (it would otherwise name a file that is not the one open)."""
    page, _, errors = _page(browser, server)
    page.get_by_role("tab", name="Recordings").click()
    box = page.locator("#afn-upload")
    box.locator("input[type=file]").set_input_files(str(ASSETS / "speech.wav"))
    page.locator("#afn-status", has_text="speech.wav (0:10)").wait_for()
    assert "speech" in box.inner_text()
    page.get_by_role("button", name="Example: Sounds (13 s)").click()
    page.locator("#afn-status", has_text="sounds.flac").wait_for()
    page.wait_for_function("() => !document.querySelector('#afn-upload').innerText.includes('speech')")

    box.locator("input[type=file]").set_input_files(str(ASSETS / "speech.wav"))
    page.locator("#afn-status", has_text="speech.wav (0:10)").wait_for()
    page.wait_for_function("() => document.querySelector('#afn-upload').innerText.includes('speech')")
    page.get_by_role("button", name="Example: Sounds (13 s)").click()
    page.locator("#afn-status", has_text="sounds.flac").wait_for()
    page.wait_for_function("() => !document.querySelector('#afn-upload').innerText.includes('speech')")
    # the upload again, from the history: opened, and the box stays empty. The list is refreshed after
    # each open, and picks the open recording: once it shows the example, it holds both uploads too.
    page.wait_for_function("() => document.querySelector('#afn-history input').value.includes('sounds')")
    page.locator("#afn-history input").click()
    page.get_by_role("option", name=re.compile("speech")).first.click()
    page.locator("#afn-status", has_text="speech.wav (0:10)").wait_for()
    assert "speech" not in box.inner_text(), "a recording opened from the history is not in the upload box"
    assert not errors, errors
    page.context.close()


def test_gradio_client_asks_about_a_recording(server):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    answer = client.predict(handle_file(str(ASSETS / "speech.wav")), "What should I buy?", True,
                            api_name="/ask_recording")
    assert answer == SCRIPTED_ANSWER
    with pytest.raises(Exception, match="not audio in a known format"):
        client.predict(handle_file(str(ROOT / "README.md")), "What is this?", False, api_name="/ask_recording")


def test_a_30_minute_recording_is_drawn(browser, server, tmp_path):
    long = tmp_path / "thirty-minutes.wav"
    t = np.arange(1800 * 16000, dtype=np.float32) / 16000
    soundfile.write(long, (0.5 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * t / 60)).astype(np.float32), 16000,
                    subtype="PCM_16")
    page, _, errors = _page(browser, server)
    page.get_by_role("tab", name="Recordings").click()
    page.evaluate(f"""() => {{  // when the server starts decoding, and when the waveform is drawn
        window.afnTimes = {{}};
        new MutationObserver(() => {{
            const status = document.querySelector('#afn-status')?.innerText || '';
            if (!afnTimes.decoding && status.includes('Decoding')) afnTimes.decoding = performance.now();
            if (!afnTimes.drawn && document.querySelector('{WAVE}')?.dataset.duration === '1800')
                afnTimes.drawn = performance.now();
        }}).observe(document.body, {{subtree: true, childList: true, attributes: true, characterData: true}});
    }}""")
    t0 = time.perf_counter()
    page.locator("#afn-upload input[type=file]").set_input_files(str(long))
    page.wait_for_function(f"() => document.querySelector('{WAVE}')?.dataset.duration === '1800'", timeout=60_000)
    REPORT["upload_30min_to_waveform_s"] = round(time.perf_counter() - t0, 2)
    times = page.evaluate("window.afnTimes")
    REPORT["decoding_30min_to_waveform_drawn_s"] = round((times["drawn"] - times["decoding"]) / 1000, 3)
    REPORT["draw_30min_waveform_ms"] = float(page.evaluate(f"document.querySelector('{WAVE}').dataset.drawnMs"))
    assert not errors, errors
    page.context.close()


def _long_recording(path: Path, minutes: int = 75) -> None:
    """A `minutes`-long FLAC (8 kHz, 16-bit) that uploads in a moment: digital silence with a half-second
    tone every 20 s, written a minute at a time. Around 25:00 (the first even cut) a minute of faint noise
    with one 1-second pause at 24:48, so the first cut falls there and the parts are not exactly even."""
    rate, rng = 8000, np.random.default_rng(75)
    tone = 0.3 * np.sin(2 * np.pi * 330 * np.arange(rate // 2) / rate)
    with soundfile.SoundFile(path, "w", rate, 1, "PCM_16", format="FLAC") as out:
        for minute in range(minutes):
            block = np.zeros(60 * rate, np.float32)
            for at in range(1, 60, 20):
                block[at * rate:at * rate + tone.size] = tone
            s = minute * 60 + np.arange(block.size) / rate
            noisy = (s >= 1470) & (s < 1530) & ~((s >= 1488) & (s < 1489))
            block[noisy] += 0.02 * rng.standard_normal(int(noisy.sum())).astype(np.float32)
            out.write(block)


def _ask_until_done(page, question: str, report: str, seen: int = 0, timeout: int = 180_000) -> list[str]:
    """Ask in the Recordings tab and wait for a "Done" status after the first `seen` ones the page's
    `afnStatuses` observer holds; the time goes into REPORT[report]; the statuses since."""
    page.locator("#afn-question textarea").fill(question)
    t0 = time.perf_counter()
    page.locator("#afn-ask").click()
    page.wait_for_function(f"() => afnStatuses.slice({seen}).some(s => s.startsWith('Done'))", timeout=timeout)
    REPORT[report] = round(time.perf_counter() - t0, 2)
    return page.evaluate(f"afnStatuses.slice({seen})")


def test_a_75_minute_recording_is_heard_in_3_parts_and_its_steps_seek_the_whole_recording(browser, server, tmp_path):
    long = tmp_path / "seventy-five-minutes.flac"
    _long_recording(long)
    assert long.stat().st_size < 15e6
    page, _, errors = _page(browser, server)
    page.get_by_role("tab", name="Recordings").click()
    page.evaluate("""() => {  // every status line shown, in order (its text, not Gradio's progress timer)
        window.afnStatuses = [];
        new MutationObserver(() => {
            const status = document.querySelector('#afn-status [data-testid=markdown]')?.innerText.trim() || '';
            if (status && status !== afnStatuses[afnStatuses.length - 1]) afnStatuses.push(status);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    t0 = time.perf_counter()
    page.locator("#afn-upload input[type=file]").set_input_files(str(long))
    page.wait_for_function(f"() => document.querySelector('{WAVE}')?.dataset.duration === '4500'"
                           f" && document.querySelector('{WAVE}').dataset.parts === '3'", timeout=60_000)
    REPORT["upload_75min_to_waveform_s"] = round(time.perf_counter() - t0, 2)
    page.locator("#afn-status", has_text="it will listen in 3 parts").wait_for(timeout=10_000)
    bounds = page.locator(f"{WAVE} .boundary")
    assert bounds.all_inner_texts() == ["Part 1", "Part 2", "Part 3"]
    starts = [float(b.evaluate("el => el.style.left").rstrip("%")) * 45 for b in bounds.all()]  # % of 4500 s
    assert starts[0] == 0 and abs(starts[1] - 1500) <= 30 and abs(starts[2] - 3000) <= 30, starts
    assert abs(starts[1] - 1488.8) < 1, "the first cut is at the pause at 24:48, not at an even 25:00"

    page.locator("#afn-think input").check()
    statuses = _ask_until_done(page, "What happens in this recording?", "think_75min_3_parts_s", timeout=240_000)
    assert any("Listening to part 2 of 3" in s for s in statuses), statuses
    assert any("Read part 3 of 3" in s for s in statuses), statuses
    assert SCRIPTED_ANSWER in page.locator("#afn-chat").inner_text()

    rows = page.locator(f"{WAVE} li[data-step]")
    script = [(0.3, 3.6), (4.0, 6.9), (7.3, 10.2)]  # the script's steps, in each part's own time
    assert rows.count() == 3 * len(script) and page.locator(f"{WAVE} .marker").count() == 3 * len(script)

    def seconds(shown: str) -> float:  # "1:15:03.3" or "24:49.1" (to the tenth the model gave)
        total = 0.0
        for field in shown.split(":"):
            total = 60 * total + float(field)
        return total

    shown: dict[int, list[tuple[int, int, str]]] = {1: [], 2: [], 3: []}
    for row in rows.all():
        part = int(row.locator(".part").inner_text().removeprefix("part "))
        start, end = row.locator(".at").inner_text().split("–")
        shown[part].append((seconds(start), seconds(end), row.get_attribute("data-step")))
    for part, at in enumerate(starts, 1):
        got = sorted(shown[part])
        assert len(got) == len(script), shown
        for (start, end, _), (a, b) in zip(got, script):  # `at`: read back from a CSS percentage, to ~0.01 s
            assert abs(start - (at + a)) < 0.2 and abs(end - (at + b)) < 0.2, (part, got, at)

    step = sorted(shown[3])[1][2]  # part 3's "from 4.0s to 6.9s": 50:04 in the whole recording
    page.locator(f"{WAVE} li[data-step='{step}']").click()
    page.wait_for_function(f"() => document.querySelector('{WAVE}').dataset.activeStep === '{step}'")
    current = page.evaluate(f"document.querySelector('{WAVE}').shadowRoot.querySelector('audio').currentTime")
    assert abs(current - (starts[2] + 4.0)) < 1.0 and current > 3000, current
    assert "active" in page.locator(f"{WAVE} .marker[data-step='{step}']").get_attribute("class")
    page.screenshot(path=SHOTS / "long-recording.png", full_page=True)

    page.evaluate("afnStatuses.splice(0, afnStatuses.length - 1)")  # the follow-up: nothing read again
    statuses = _ask_until_done(page, "And when is the tone loudest?", "think_75min_follow_up_s", seen=1)
    assert not any("Read part" in s or "encoder" in s for s in statuses), statuses
    assert page.locator('#afn-chat [data-testid="user"]').count() == 2
    page.wait_for_function("answer => [...document.querySelectorAll('#afn-chat [data-testid=bot]')]"
                           ".filter(m => m.innerText.trim() === answer).length === 2", arg=SCRIPTED_ANSWER)
    assert rows.count() == 3 * len(script)
    # the parts answered side by side, their steps interleaved as they came: the list is in time order
    shown_at = [seconds(t.split("–")[0]) for t in page.locator(f"{WAVE} li[data-step] .at").all_inner_texts()]
    assert shown_at == sorted(shown_at), shown_at
    page.screenshot(path="/tmp/long-recording-follow-up.png", full_page=True)
    assert not errors, errors
    page.context.close()


def test_the_question_and_rename_boxes_are_named_for_screen_readers(browser, server):
    """Both text boxes are hidden-label Gradio textboxes: each needs its own name, not Gradio's "Textbox"."""
    page, _, errors = _page(browser, server)
    page.get_by_role("tab", name="Recordings").click()
    assert page.get_by_role("textbox", name="Question about the recording").count() == 1
    assert page.get_by_role("textbox", name="A new name for the recording").count() == 1
    assert page.get_by_role("textbox", name="Textbox", exact=True).count() == 0
    assert not errors, errors
    page.context.close()


def _recording_audio(page) -> dict:
    return page.evaluate(f"() => {{ const a = document.querySelector('{WAVE}').shadowRoot.querySelector('audio');"
                         " return {paused: a.paused, src: a.getAttribute('src')}; }")


# Whether a spoken answer plays, `s` seconds into it at least: Gradio's player keeps its <audio> in a shadow root.
SPOKEN_PLAYING = """(s) => { const playing = (node) => [...node.querySelectorAll('*')].some((el) => (el.tagName === 'AUDIO'
  && !el.paused && el.src.startsWith('blob:') && el.currentTime >= s) || (el.shadowRoot && playing(el.shadowRoot)));
  return playing(document.querySelector('#afn-spoken')); }"""


def test_one_sound_at_a_time_and_a_deleted_recording_stops(browser, server):
    """Speak the answer talked over the recording and Play on the recording over the spoken answer; a deleted
    recording played on with no waveform left to stop it from."""
    page, _, errors = _page(browser, server)
    _open_example(page, "Sounds (13 s)")
    _ask(page, "Anything to say?", False, 1)
    page.locator(f"{WAVE} .play").click()
    page.wait_for_function(f"() => !document.querySelector('{WAVE}').shadowRoot.querySelector('audio').paused")
    page.get_by_role("button", name="Speak the answer").click()
    page.wait_for_function(SPOKEN_PLAYING, arg=0.3, timeout=30_000)  # well under way, as a listener hears it
    assert _recording_audio(page)["paused"], "Speak the answer paused the recording"
    page.locator(f"{WAVE} .play").click()
    page.wait_for_timeout(200)
    assert not page.evaluate(SPOKEN_PLAYING, 0), "Play on the recording paused the spoken answer"
    page.wait_for_function(f"() => !document.querySelector('{WAVE}').shadowRoot.querySelector('audio').paused")
    page.wait_for_function("() => document.querySelector('#afn-history input').value.includes('sounds')")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#afn-delete").click()
    page.locator("#afn-status", has_text="Deleted").wait_for(timeout=10_000)
    page.wait_for_timeout(300)
    assert _recording_audio(page) == {"paused": True, "src": None}
    assert not errors, errors
    page.context.close()


def test_the_waveforms_clock_stays_on_one_line_on_a_phone(browser, server, tmp_path):
    """On a phone a long file name took the clock's room and broke "0:00 / 0:10" over three lines."""
    clip = tmp_path / ("the_weekly_engineering_meeting_about_the_voice_assistant_" * 2 + ".wav")
    soundfile.write(clip, (0.3 * np.sin(np.arange(32000) / 5)).astype(np.float32), 16000, subtype="PCM_16")
    page, _, errors = _page(browser, server, viewport={"width": 375, "height": 800})
    page.get_by_role("tab", name="Recordings").click()
    page.locator("#afn-upload input[type=file]").set_input_files(str(clip))
    page.wait_for_function(f"() => document.querySelector('{WAVE}')?.dataset.duration")
    clock, button = page.locator(f"{WAVE} .time").bounding_box(), page.locator(f"{WAVE} .play").bounding_box()
    assert clock["height"] <= button["height"], clock
    assert not errors, errors
    page.context.close()
