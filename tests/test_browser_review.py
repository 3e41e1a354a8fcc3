"""The web app as a first-time user finds it, in headless Chromium: what a review with a real browser
found broken, each checked here so it stays fixed. The fixtures and helpers are tests/test_browser.py's;
the server here slows the scripted Think model (50 ms a token) so an answer is still streaming when
the user does something else."""

from __future__ import annotations

import pytest

from tests import test_browser
from tests.test_browser import _open_example, _page
from tests.web.running import free_port, running

pytestmark = test_browser.pytestmark  # skipped where Debian's chromium is not installed
chromium = test_browser.browser  # the browser tests' Chromium (a module-scoped fixture), by this name here


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running(["-m", "tests.web.server", "--port", str(free_port()), "--step-delay-s", "0.05"], log) as (_, url):
        yield url


def test_opening_another_recording_while_an_answer_streams_shows_only_the_new_one(chromium, slow_server):
    """The old answer is cut off, and none of it lands on the new recording's chat or status line."""
    page, errors = _answering(chromium, slow_server, "What is this recording?")
    page.get_by_role("button", name="Example: Sounds (13 s)").click()
    page.locator("#afn-status", has_text="sounds.flac (0:13)").wait_for(timeout=30_000)
    _watch(page)
    _answer_ended(page)  # cut off
    seen = page.evaluate("seen")
    assert all("What is this recording?" not in chat and "sounds.flac" in status for status, chat in seen), seen[-1]
    assert not errors, errors
    page.context.close()


def _answering(chromium, server: str, question: str):
    """A page with the speech example open, `question` asked in Think mode and being answered: (page, errors)."""
    page, _, errors = _page(chromium, server)
    _open_example(page, "Speech (10 s)")
    page.locator("#afn-think input").check()
    page.locator("#afn-question textarea").fill(question)
    page.locator("#afn-ask").click()
    page.locator("#afn-status", has_text="Reasoning").wait_for(timeout=60_000)
    return page, errors


def _watch(page) -> None:
    """Keep every (status line, chat) the page shows from now on in `window.seen`."""
    page.evaluate("""() => {
        window.seen = [];
        const note = () => seen.push([document.querySelector('#afn-status').innerText,
                                      document.querySelector('#afn-chat').innerText]);
        note();
        new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")


def _answer_ended(page) -> None:
    """The chat's progress indicator has gone: the answer has ended, and all it sent has arrived."""
    page.wait_for_function("() => document.querySelector('#afn-chat [data-testid=status-tracker]')"
                           ".classList.contains('hide')", timeout=30_000)


def test_deleting_the_open_recording_while_an_answer_streams_leaves_the_page_empty(chromium, slow_server):
    page, errors = _answering(chromium, slow_server, "Deleted while answering?")
    page.wait_for_function("() => document.querySelector('#afn-history input').value.startsWith('speech.wav')")
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#afn-delete").click()  # the open recording, which the list shows picked
    page.locator("#afn-status", has_text="Deleted").wait_for(timeout=10_000)
    _watch(page)
    _answer_ended(page)
    seen = page.evaluate("seen")
    assert all(status.startswith("Deleted") and "Deleted while answering?" not in chat for status, chat in seen), seen[-1]
    assert not errors, errors
    page.context.close()


def test_the_chat_toolbar_has_no_share_button_that_does_nothing_here(chromium, slow_server):
    """Gradio's Share posts to a Hugging Face Space's discussions and does nothing anywhere else (not even
    an error): shown on a Space only. Each button left is named, and Clear stays hidden."""
    page, _, errors = _page(chromium, slow_server)
    _open_example(page, "Speech (10 s)")
    page.locator("#afn-question textarea").fill("Which buttons are there?")
    page.locator("#afn-ask").click()
    page.locator("#afn-chat button[aria-label='Copy conversation']").wait_for(timeout=60_000)
    toolbar = page.locator("#afn-chat .icon-button-wrapper.top-panel > button")
    shown = [b.get_attribute("aria-label") for b in toolbar.all() if b.is_visible()]
    assert shown == ["Copy conversation"], shown
    assert not errors, errors
    page.context.close()
