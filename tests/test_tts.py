"""Speech out: the chunker (split-invariant, never reasoning), espeak streaming, Pocket TTS streaming, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from afnext.events import AudioChunk, ReasoningDelta, TextDelta
from afnext.tts import Synthesizer, TTSError, load_synthesizer
from afnext.tts.chunker import ChunkerOptions, SpeechChunker, speakable

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- chunker

TEXTS = {
    "abbreviations": "Sure thing, Dr. Smith will see you at 1:30 p.m. tomorrow. The dose is 3.5 mg, e.g. half "
                     "a tablet... Visit https://example.com/a.b?c=1 for more. **Bold** and `code`!\n- first item\n"
                     "- second",
    "ellipses": "Well... I think so. Really?! Yes… The U.S. Army is big. It costs $1,000.50, roughly, which is "
                "a lot.",
    "markdown": "## Summary\n\n1. Preheat the oven.\n2. Mix the flour, sugar and eggs; then bake.\n\n```python\n"
                "print('hi')\n```\nThat's it — enjoy! See [the docs](https://x.org/a_b) (Fig. 3) for more.",
    "clauses": "The capital of France, as you probably know, is Paris; it has been the capital for a very long time, "
               "and it is also, by a wide margin, the largest city in the whole country, with millions of people. Ok.",
    "scripts": "你好！今天天气很好。我们去公园散步吧，好不好？「いいね！」と彼は言った。नमस्ते। आज मौसम अच्छा है।",
    "arabic": "مرحبا يا صديقي العزيز، كيف حالك اليوم؟ أنا بخير، شكرا لك على السؤال. وأنت؟ جيد.",
    "lists and numbers": "Pick a, b, c. Done, I counted them all, 42. Then A, B or C. Ask J. Smith. The result of "
                         "10 - 3 is 7 - trust me! It ran [12.5 - 15.0] and $5 - $10.\n1. Mix\n2. Bake",
    "french and german": "Il a dit : « Bonjour. » Puis il est parti ? » Oui. Am 3. Oktober, vgl. Kapitel 3, "
                         "sagte er: „Hallo.“ Dann ging er.",
}


def chunk_once(text: str, splits: list[int], options: ChunkerOptions = ChunkerOptions()) -> list[str]:
    chunker, pieces, last = SpeechChunker(options), [], 0
    for cut in [*splits, len(text)]:
        pieces += chunker.feed(TextDelta(text[last:cut]))
        last = cut
    return pieces + chunker.flush()


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_chunker_pieces_do_not_depend_on_the_split(name):
    text = TEXTS[name]
    whole = chunk_once(text, [])
    assert len(whole) >= 3
    for cut in range(len(text) + 1):
        assert chunk_once(text, [cut]) == whole, f"split at {cut}: {text[:cut]!r} | {text[cut:]!r}"
    assert chunk_once(text, list(range(1, len(text)))) == whole  # one character at a time
    rng = np.random.default_rng(0)
    for _ in range(20):
        cuts = sorted(rng.choice(len(text), size=6, replace=False).tolist())
        assert chunk_once(text, cuts) == whole


def test_chunker_pieces():
    assert chunk_once(TEXTS["abbreviations"], []) == [
        "Sure thing, Dr. Smith will see you at 1:30 p.m. tomorrow.",  # "Sure thing," is too short to go alone
        "The dose is 3.5 mg, e.g. half a tablet...",
        "Visit https://example.com/a.b?c=1 for more.",
        "Bold and code!",
        "first item",
        "second",
    ]
    assert chunk_once(TEXTS["ellipses"], []) == [
        "Well...", "I think so.", "Really?!", "Yes…", "The U.S. Army is big.",
        "It costs $1,000.50, roughly, which is a lot."]
    assert chunk_once(TEXTS["markdown"], []) == [
        "Summary", "1. Preheat the oven.", "2. Mix the flour, sugar and eggs; then bake.", "print('hi')",
        "That's it — enjoy!", "See the docs (Fig. 3) for more."]
    first, *rest = chunk_once(TEXTS["clauses"], [])
    assert first == "The capital of France,"  # early: the first clause break after three words
    assert rest[0].startswith("as you probably know, is Paris; it has been")  # later: long clauses only
    assert rest[-1] == "Ok." and all(len(piece) >= 50 for piece in rest[:-1])


def test_chunker_ends_pieces_at_the_marks_of_scripts_without_spaces():
    """Full-width ends need no space after them; before, a Chinese reply got no audio until its end."""
    assert chunk_once(TEXTS["scripts"], []) == [
        "你好！", "今天天气很好。", "我们去公园散步吧，好不好？", "「いいね！」", "と彼は言った。", "नमस्ते।",
        "आज मौसम अच्छा है।"]
    chunker = SpeechChunker()
    assert chunker.feed(TextDelta("今天天气很好，我们")) == ["今天天气很好，"]  # the first clause, at once
    assert chunker.feed(TextDelta("去公园。然")) == ["我们去公园。"]
    unbroken = "我们去公园散步然后一起吃午饭" * 20  # no mark at all, as from a random model
    first, second, *rest = chunk_once(unbroken, [])
    assert len(first) == 40 and len(second) == 125  # 80 and 250 wide characters' width
    assert "".join([first, second, *rest]) == unbroken


def test_arabic_question_marks_and_commas_end_pieces():
    """Arabic writes ؟ ، ؛ where Latin writes ? , ;: before, a question ran on into the next sentence."""
    assert chunk_once(TEXTS["arabic"], []) == [
        "مرحبا يا صديقي العزيز،", "كيف حالك اليوم؟", "أنا بخير، شكرا لك على السؤال.", "وأنت؟", "جيد."]


def test_emoji_are_not_read_aloud():
    """espeak-ng reads 😀 as "grinning face" and 🎉 as "party popper"; arrows, degrees and sharps carry meaning."""
    assert speakable("Great job! 🎉 You did it 😀.") == "Great job! You did it."
    assert speakable("Hello 👋🏽, well done ✅ ⭐ 1️⃣ 👨‍👩‍👧 🇫🇷") == "Hello, well done 1"
    assert speakable("A → B at 25°C in C♯ minor") == "A → B at 25°C in C♯ minor"
    assert chunk_once("Sure! 🎉 The answer is 42 😀. 👍", []) == ["Sure!", "The answer is 42."]


def test_a_short_capitalised_word_before_a_number_is_an_abbreviation():
    assert chunk_once("Go to room No. 5 and wait. See Sec. 3 for details.", []) == [
        "Go to room No. 5 and wait.", "See Sec. 3 for details."]
    assert chunk_once("Born in 1990. 30 years later he left. Read pp. 4 to 6.", []) == [
        "Born in 1990.", "30 years later he left.", "Read pp. 4 to 6."]
    assert chunk_once("It opens on Sept. 5 at noon. Come early.", []) == ["It opens on Sept. 5 at noon.", "Come early."]


def test_a_sentence_that_ends_in_a_single_letter_is_cut_there():
    """Before, any one letter before a period was an initial ("J. Smith"), so "c. Done." stayed together."""
    assert chunk_once("a, b, c. Done.", []) == ["a, b, c.", "Done."]
    assert chunk_once("A, B or C. Done.", []) == ["A, B or C.", "Done."]
    assert chunk_once("Options A, B, C. Done.", []) == ["Options A, B,", "C.", "Done."]  # the list across a cut
    assert chunk_once("Ask J. Smith. Now, Mary and J. R. Tolkien. See p. 5 for more.", []) == [
        "Ask J. Smith.", "Now, Mary and J. R. Tolkien.", "See p. 5 for more."]  # initials and pages stay


def test_a_number_after_a_clause_break_is_no_list_marker():
    """Before, "42." opening a piece was a numbered-list marker even right after a clause break."""
    assert chunk_once("Well I counted them all, 42. Done.", []) == ["Well I counted them all,", "42.", "Done."]
    assert chunk_once("Steps: easy.\n1. Mix it.\n2. Bake it. 3. Eat.", []) == [
        "Steps: easy.", "1. Mix it.", "2. Bake it.", "3. Eat."]  # markers on a line or after a sentence


def test_a_spaced_dash_between_numbers_is_no_clause_break():
    """A minus or a range ("10 - 3", a Think-mode "[12.5 - 15.0]"): before, the first piece was cut inside it."""
    assert chunk_once("The result of 10 - 3 is 7. Yes.", []) == ["The result of 10 - 3 is 7.", "Yes."]
    assert chunk_once("The lyrics I heard at [12.5 - 15.0] say hello. Ok.", []) == [
        "The lyrics I heard at [12.5 - 15.0] say hello.", "Ok."]
    assert chunk_once("It costs about $5 - $10 each. Ok.", []) == ["It costs about $5 - $10 each.", "Ok."]
    assert chunk_once("We were in 2023 - the year of change. Ok.", []) == [
        "We were in 2023 -", "the year of change.", "Ok."]  # a dash before words still is one


def test_closing_quotes_of_french_and_german_stay_with_their_sentence():
    """« Bonjour. » (a space before the closing guillemet), „Hallo.“ and »Hallo.«: before, the closing
    mark began the next piece."""
    assert chunk_once("Il a dit : « Bonjour. » Puis il est parti ? » Oui.", []) == [
        "Il a dit :", "« Bonjour. »", "Puis il est parti ? »", "Oui."]
    assert chunk_once("Er sagte: „Hallo.“ Dann »Tschüss.« Ende.", []) == [
        "Er sagte: „Hallo.“", "Dann »Tschüss.«", "Ende."]


def test_german_ordinals_and_abbreviations_do_not_end_sentences():
    """Before, "Am 3." was spoken alone and "Oktober ist Feiertag." after it."""
    assert chunk_once("Am 3. Oktober ist Feiertag. Im 19. Jahrhundert, vgl. Kapitel 3. Ja.", []) == [
        "Am 3. Oktober ist Feiertag.", "Im 19. Jahrhundert, vgl. Kapitel 3.", "Ja."]
    assert chunk_once("Gen. Patton won. It is 42. Then we left.", []) == [
        "Gen. Patton won.", "It is 42.", "Then we left."]


def test_triple_backticks_inside_a_line_keep_their_words():
    """Only a fence opening a line has a language tag: before, "inline" was dropped as one."""
    assert speakable("Text with ```inline fence``` here.") == "Text with inline fence here."
    assert speakable("```python\n") == "" and speakable("  ```\n") == ""


def test_asterisks_are_stripped_as_emphasis_only():
    assert speakable("2 * 3 = 6, and 5*4 = 20.") == "2 * 3 = 6, and 5*4 = 20."  # arithmetic is spoken
    assert speakable("**Bold** and *this*, a **b**") == "Bold and this, a b"


def test_chunker_releases_each_sentence_as_soon_as_it_is_decidable():
    chunker = SpeechChunker()
    assert chunker.feed(TextDelta("It is sunny today")) == []
    assert chunker.feed(TextDelta(", with")) == ["It is sunny today,"]
    assert chunker.feed(TextDelta(" a breeze.")) == []  # "." could still be "e.g." or "3.5"
    assert chunker.feed(TextDelta(" Next")) == ["with a breeze."]
    assert chunker.flush() == ["Next"] and chunker.flush() == []


def test_text_without_breaks_is_cut_early_for_the_first_piece_only():
    words = " ".join(f"word{i}" for i in range(100))  # no punctuation at all, as from a random model
    first, second, *rest = chunk_once(words, [])
    assert 80 <= len(first) < 90 and 250 <= len(second) < 260
    assert " ".join([first, second, *rest]) == words
    assert len(chunk_once(words, [], ChunkerOptions(first_max_chars=250))[0]) >= 250


def test_reasoning_never_reaches_the_chunker():
    chunker = SpeechChunker()
    with pytest.raises(TypeError, match="ReasoningDelta"):
        chunker.feed(ReasoningDelta("At 1.5 s the speaker laughs."))
    with pytest.raises(TypeError):
        chunker.feed("plain text")
    assert speakable("# **Title**") == "Title" and speakable("---") == ""
    assert speakable("> `x_y` __init__ | [docs](http://a.b)") == "x_y init docs"


TONE = np.sin(np.arange(22050) / 10).astype(np.float32)  # 1 s at 22,050 Hz


def test_speech_resampler_keeps_the_tail_when_the_rate_changes():
    """A piece at another rate (another voice) flushes the last rate's filter: before, its last ~18 ms were lost."""
    from afnext.tts import SpeechResampler

    resampler = SpeechResampler(24000)
    out = [resampler.push(AudioChunk(22050, TONE[i:i + 2205])) for i in range(0, 11025, 2205)]  # 0.5 s
    out += [resampler.push(AudioChunk(16000, TONE[:8000])), resampler.end()]  # 0.5 s more
    assert abs(sum(map(len, out)) - 24000) <= 2 and not resampler.in_reply


def test_speech_resampler_survives_a_drop_in_the_middle_of_a_push():
    """A barge-in's `drop` (another thread) landing between push's making the stream and using it: before,
    AttributeError on None."""
    from afnext.tts import SpeechResampler

    class DroppedAtOnce(SpeechResampler):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "_stream" and value is not None:
                self.drop()  # the barge-in lands right after push made the reply's stream

    assert len(DroppedAtOnce(24000).push(AudioChunk(22050, TONE[:2205]))) > 0


# ---------------------------------------------------------------------------- espeak


@pytest.fixture(scope="module")
def espeak():
    pytest.importorskip("espeakng_loader")
    return load_synthesizer("espeak")


def test_espeak_streams_chunks_of_the_whole_sentence(espeak):
    from afnext.tts.espeak import synthesize

    text = "Hello there, this is a streaming test of the voice assistant, spoken in several chunks."
    chunks = list(espeak.stream(text))
    assert isinstance(espeak, Synthesizer) and espeak.sample_rate == 22050
    assert len(chunks) >= 5 and all(isinstance(c, AudioChunk) and c.samples.dtype == np.float32 for c in chunks)
    audio = np.concatenate([c.samples for c in chunks])
    assert 3.0 < len(audio) / 22050 < 9.0 and 0.1 < np.abs(audio).max() <= 1.0  # ~14 words at 170 wpm
    # streamed ≈ whole: espeak-ng itself varies a clip's length by a few hundred samples from call to call
    assert abs(len(audio) - len(synthesize(text)[1])) < 0.02 * len(audio)
    assert list(espeak.stream("   ")) == []


def test_espeak_stops_on_cancel_and_on_close(espeak):
    text = "This sentence is long enough to be spoken in many chunks, " * 6
    whole = len(list(espeak.stream(text)))
    cancel = threading.Event()
    got = []
    for chunk in espeak.stream(text, cancel=cancel):
        got.append(chunk)
        cancel.set()
    assert len(got) == 1 < whole
    stream = espeak.stream(text)
    next(stream)
    stream.close()  # aborts espeak and joins its worker: the engine is free again at once
    assert len(list(espeak.stream("Again."))) >= 1


class CancelledWhileMaking(threading.Event):
    """A barge-in that lands while the first audio is being made: set the moment this (test) thread first
    looks at it, after the synthesizer decided to go on, so what it made meanwhile must be dropped."""

    def is_set(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return super().is_set()
        was = super().is_set()
        self.set()
        return was


def test_espeak_yields_nothing_once_cancelled_even_mid_block(espeak):
    assert list(espeak.stream("Hello there, how are you today?", cancel=CancelledWhileMaking())) == []
    assert len(list(espeak.stream("Again."))) >= 1


def test_missing_dependency_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "espeak" in name else real(name, *a))
    with pytest.raises(TTSError, match="pip install espeakng-loader"):
        load_synthesizer("espeak")


def test_espeak_library_that_cannot_load_is_one_clear_error(monkeypatch):
    """A wheel whose library will not load (another platform's, a broken install): TTSError, not OSError."""
    espeakng_loader = pytest.importorskip("espeakng_loader")
    from afnext.tts import espeak as espeak_module

    monkeypatch.setattr(espeak_module, "_engine", None)
    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: "/nonexistent/libespeak-ng.so")
    with pytest.raises(TTSError, match="could not load the espeak-ng library"):
        load_synthesizer("espeak")


def test_espeak_reads_each_script_with_a_voice_that_knows_it(espeak):
    """The en-us voice spells Chinese as "Chinese letter" per character, Arabic, Hebrew, Greek, Cyrillic and
    Thai letter by letter: a piece mostly in such a script is read with that script's voice."""
    from afnext.tts.espeak import synthesize, voice_for

    assert voice_for("今天天气很好。", "en-us") == "cmn" and voice_for("こんにちは、東京。", "en-us") == "ja"
    assert voice_for("كيف حالك؟", "en-us") == "ar" and voice_for("Привет, мир.", "en-gb") == "ru"
    assert voice_for("שלום", "en-us") == "he" and voice_for("Γειά σου", "en-us") == "el"
    assert voice_for("Say 你好 to them.", "en-us") == "en-us"  # mostly Latin: the chosen voice
    assert voice_for("Привет", "uk") == "uk" and voice_for("你好", "yue") == "yue"  # a voice that reads it
    assert voice_for("नमस्ते", "en-us") == "en-us"  # espeak-ng switches to Hindi itself
    text = "今天天气很好。"
    spoken = np.concatenate([c.samples for c in espeak.stream(text)])
    assert abs(len(spoken) - len(synthesize(text, voice="cmn")[1])) < 0.05 * len(spoken)
    assert len(list(espeak.stream("Hello again."))) >= 1 and espeak.voice == "en-us"


def test_unknown_engine_and_voice():
    with pytest.raises(ValueError, match="Unknown TTS engine"):
        load_synthesizer("festival")
    pytest.importorskip("espeakng_loader")
    with pytest.raises(ValueError, match="no voice"):
        load_synthesizer("espeak", model="no-such-voice")


# ---------------------------------------------------------------------------- Pocket TTS


@pytest.fixture(scope="module")
def pocket_dir(tmp_path_factory):
    from afnext.tts.pocket import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("pocket") / "tiny")


@pytest.fixture(scope="module")
def pocket(pocket_dir):
    return load_synthesizer("pocket", model=str(pocket_dir), device="cpu")


def test_pocket_first_chunk_leaves_before_generation_is_done(pocket):
    stream = pocket.stream("Hello there, this is a test.")
    first = next(stream)
    frames_at_first = pocket.frames_generated
    rest = list(stream)
    assert pocket.sample_rate == 24000 and first.sample_rate == 24000 and first.samples.dtype == np.float32
    assert frames_at_first == 1 and len(first.samples) == 1920  # one 80 ms frame, out before the second exists
    assert pocket.frames_generated > 20 and len(rest) >= 10
    assert sum(len(c.samples) for c in rest) == (pocket.frames_generated - 1) * 1920
    assert all(np.abs(c.samples).max() <= 1.0 for c in rest)


def test_pocket_stream_equals_generate_then_decode(pocket):
    """With zero flow noise the streamed audio is exactly transformers' generate() + processor.decode()."""
    from afnext.tts.pocket import PocketOptions, PocketSynthesizer

    text = "It is sunny today."
    synth = PocketSynthesizer(pocket.model, pocket.processor, PocketOptions(temperature=0.0, chunk_frames=3))
    streamed = np.concatenate([c.samples for c in synth.stream(text)])
    processor = pocket.processor
    conversation = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conversation, tokenize=False)
    latents = pocket.model.generate(**processor(text=prompt, return_tensors="pt"), do_sample=False)[0]
    whole = np.clip(processor.decode(latents).numpy(), -1, 1)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=1e-4)


def test_streaming_decoder_equals_one_shot_decode(pocket):
    import torch

    from afnext.tts.pocket import StreamingDecoder

    codec = pocket.codec
    latents = torch.randn(1, 23, codec.config.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = codec.decode(latents).audio_values[:, 0]
    for sizes in ([1] * 23, [2, 5, 1, 15], [23]):  # > sliding window: its cache trimming is exercised
        decoder, parts, start = StreamingDecoder(codec), [], 0
        for size in sizes:
            parts.append(decoder(latents[:, start:start + size]))
            start += size
        torch.testing.assert_close(torch.cat(parts, dim=-1), whole, atol=1e-5, rtol=1e-4)


def test_pocket_end_of_speech_and_cancel(pocket):
    from afnext.tts.pocket import PocketOptions, PocketSynthesizer

    ends_early = PocketSynthesizer(pocket.model, pocket.processor, PocketOptions(eos_threshold=-1e9))
    list(ends_early.stream("Hello there, this is a test."))
    # the end-of-speech logit is over the threshold from the first frame it may count (frame 6): the
    # processor asks for 2 frames after it for a text of more than four words
    assert ends_early.frames_generated == 6 + 1 + 2
    cancel = threading.Event()
    for _ in pocket.stream("Hello there, this is a test.", cancel=cancel):
        cancel.set()
    assert pocket.frames_generated == 1


def test_pocket_never_yields_nan_or_inf(pocket, monkeypatch):
    """A codec that overflows (half precision, a bad checkpoint) must not reach the player or the resampler,
    where one NaN spreads over the rest of the reply: non-finite samples become silence or full scale."""
    import torch

    from afnext.tts.pocket import StreamingDecoder

    def broken(self, latents):
        samples = torch.full((1, latents.shape[1] * 1920), float("nan"))
        samples[0, :3] = torch.tensor([float("inf"), float("-inf"), 0.5])
        return samples

    monkeypatch.setattr(StreamingDecoder, "__call__", broken)
    cancel = threading.Event()
    chunks = []
    for chunk in pocket.stream("Hello there.", cancel=cancel):
        chunks.append(chunk)
        cancel.set()
    assert len(chunks) == 1 and np.isfinite(chunks[0].samples).all()
    assert np.abs(chunks[0].samples).max() <= 1.0 and chunks[0].samples.dtype == np.float32


def test_pocket_yields_nothing_once_cancelled_even_mid_frame(pocket):
    """Pocket checks the cancel before each frame; one set while a frame is made (tens of ms on a real model,
    where most barge-ins land) must not let that frame's audio out."""
    assert list(pocket.stream("Hello there.", cancel=CancelledWhileMaking())) == []
    assert pocket.frames_generated == 1


def test_pocket_clones_a_voice_and_splits_long_text(pocket, tmp_path):
    import soundfile as sf

    from afnext.tts.pocket import PocketOptions, PocketSynthesizer

    sf.write(tmp_path / "voice.wav", np.random.default_rng(0).uniform(-0.1, 0.1, 16000).astype(np.float32), 16000)
    cloned = PocketSynthesizer(pocket.model, pocket.processor, PocketOptions(voice=str(tmp_path / "voice.wav")))
    inputs = cloned._inputs("Hello there.")
    assert inputs["audio_prompt_latents"].shape[1] == 14  # 1 s at 24 kHz + the 80 ms pause, in 80 ms frames
    assert next(cloned.stream("Hello there.")).samples.size == 1920
    text = "Hello there, this is a test of the voice assistant. What is said in this recording?"
    assert len(pocket._segments(text)) == 2  # over 50 tokens (the tiny vocabulary is small): one per sentence
    chunks = list(pocket.stream(text))
    assert sum(c.samples.size for c in chunks) == pocket.frames_generated * 1920


def test_pocket_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(TTSError, match="No Pocket TTS checkpoint folder"):
        load_synthesizer("pocket", model=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(TTSError, match="not a loadable Pocket TTS checkpoint"):
        load_synthesizer("pocket", model=str(tmp_path), device="cpu")
    with pytest.raises(TTSError, match=r"not in the local Hugging Face cache.*HF_HUB_OFFLINE=1.*model name 'tiny'"):
        load_synthesizer("pocket", model="afnext-tests/no-such-pocket-tts", device="cpu")  # offline: conftest


# ---------------------------------------------------------------------------- command line


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_espeak_json(tmp_path):
    pytest.importorskip("espeakng_loader")
    import soundfile as sf

    out = tmp_path / "hi.wav"
    proc = run("afnext.tts", "Hello there, **this** is a test.", "--engine", "espeak", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert set(figures) == {"first_chunk_s", "audio_s", "rtf", "sample_rate"} and figures["sample_rate"] == 22050
    assert 0 < figures["first_chunk_s"] < 1.0 and 0.8 < figures["audio_s"] < 4.0 and figures["rtf"] < 1.0
    samples, rate = sf.read(out)
    assert rate == 22050 and abs(len(samples) / rate - figures["audio_s"]) < 0.01


def test_cli_tiny_tts_checkpoint_then_pocket_json(tmp_path, capsys):
    from afnext.tiny import main as tiny_main

    tiny_main(["--tts", str(tmp_path / "pocket")])  # python -m afnext.tiny --tts DIR, in process
    assert "Pocket TTS" in capsys.readouterr().out
    assert (tmp_path / "pocket" / "audio_tokenizer" / "config.json").exists()
    proc = run("afnext.tts", "Hello there.", "--engine", "pocket", "--model", str(tmp_path / "pocket"),
               "--device", "cpu", "--out", str(tmp_path / "p.wav"), "--json")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    assert figures["sample_rate"] == 24000 and figures["audio_s"] > 0.5 and 0 < figures["first_chunk_s"] < 5
