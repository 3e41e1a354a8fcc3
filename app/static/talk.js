// The Talk tab: runs as a gr.HTML js_on_load body (`element`). Speaks OpenAI's Realtime protocol
// to the server's own /v1/realtime (app/realtime.py; README, "Realtime"): the microphone goes up as
// pcm16 24 kHz appends, the server's VAD ends turns (or push-to-talk commits them), the reply's
// audio deltas play gaplessly with Web Audio, and speaking over a reply stops it and tells the
// server how much was heard (conversation.item.truncate). Lives in a shadow root, out of Gradio's
// re-rendering. One socket is one conversation: Stop mutes the microphone and keeps it.
// The server keeps each conversation under this browser's owner token (owner.js); the history list
// reopens one (the socket asks for ?conversation=ID), and a reload shows and goes on with the open one.

const host = element.querySelector(".afn-talk");
const root = host.attachShadow({ mode: "open" });
root.innerHTML = `
<style>
  :host { display: block; font: inherit; color: var(--body-text-color, #222); }
  .bar { display: flex; flex-wrap: wrap; gap: .75em; align-items: center; }
  button { font: inherit; cursor: pointer; border-radius: 8px; border: 1px solid #8888; background: none; color: inherit; padding: .4em 1em; }
  /* a keyboard user sees where they are: the browser's own 1 px ring is lost on the orange button */
  button:focus-visible, input:focus-visible, summary:focus-visible { outline: 3px solid #2563eb; outline-offset: 2px; }
  button.primary { background: #f97316; color: white; border-color: #f97316; }
  button[hidden] { display: none; }
  button.held { background: #e4572e; color: white; }
  meter { width: 8em; }
  .state { font-weight: 600; text-transform: capitalize; min-width: 7em; }
  .state[data-state=listening] { color: #16a34a; } .state[data-state=thinking] { color: #ca8a04; }
  .state[data-state=speaking] { color: #2563eb; }
  .notice { background: #fde68a55; border-left: 4px solid #f59e0b; padding: .5em .8em; margin: .6em 0; }
  .latency { opacity: .75; font-size: .9em; margin: .4em 0; min-height: 1.2em; font-variant-numeric: tabular-nums; }
  ol { list-style: none; padding: 0; margin: .5em 0; max-height: 28em; overflow-y: auto; }
  li { padding: .45em .7em; margin: .3em 0; border-radius: 8px; overflow-wrap: anywhere; }  /* a long link wraps */
  li.user { background: #8881; } li.assistant { background: #3b82f614; }
  li .who { font-weight: 600; margin-right: .5em; }
  li.interrupted .answer::after { content: " — interrupted"; opacity: .6; font-style: italic; }
  details { opacity: .75; font-size: .92em; }
  details.history { opacity: 1; margin: .6em 0; }
  .history ul { list-style: none; padding: 0; margin: .4em 0; max-height: 14em; overflow-y: auto; }
  .history li { display: flex; gap: .5em; align-items: center; padding: .25em .5em; margin: .15em 0; }
  .history li.open { background: #f9731622; }
  .history .title { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .history button { padding: .15em .6em; font-size: .9em; }
  .history .disk { opacity: .7; font-size: .9em; }
</style>
<div class="bar">
  <button class="start primary">Start talking</button>
  <label><input type="checkbox" class="ptt-mode"> Push-to-talk</label>
  <button class="ptt" hidden>Hold to talk (or hold Space)</button>
  <button class="new">New conversation</button>
  <meter class="level" min="0" max="1" value="0" title="Microphone level"></meter>
  <span class="state" data-state="idle" aria-live="polite">idle</span>
</div>
<details class="history"><summary>Your conversations</summary><ul></ul><div class="disk"></div></details>
<div class="notice" role="alert" hidden></div>
<div class="latency"></div>
<ol class="transcript"></ol>`;

const $ = (sel) => root.querySelector(sel);
const pttButton = $(".ptt");
const RATE = 24000;  // Hz both ways: pcm16 as the Realtime protocol speaks it
const BLOCK_S = 0.04;  // microphone audio per append
const ANTI_ALIAS_HZ = 7000;  // two low-pass biquads before the worklet's resampler (speech ends well below 8 kHz)
const KEEP_S = 90;  // seconds of sent microphone audio kept for the replay buttons
const MAX_PTT_S = 30, MIN_PTT_S = 0.25;  // a push-to-talk press: what the server hears at most; a slip
const LOAD_POLL_MS = 2000;  // how often the page asks whether the model has loaded

let ctx = null, stream = null, ws = null, worklet = null, workletLoaded = false;
let starting = false;  // between the Start click and the microphone being on
let live = false;  // the current socket's session was created and configured
let hadConversation = false;  // a socket was live before: a new one starts afresh, and the page says so
let sent = 0;  // samples sent on the server's current audio timeline (reset with each turn_detection change)
let sentLog = [];  // [seconds on that timeline, performance.now()] to time "end of speech"
let kept = [];  // [{start, pcm}] the sent audio, for replaying the user's turns
let nextPlay = 0, playing = [];  // gapless reply playback
let speech = { start: 0, end: 0 };  // the turn the server's VAD is hearing, ms on the timeline
let press = null;  // push-to-talk: {chunks, samples, full} while the button is held
let presses = [];  // finished presses waiting for the server's commit: {audio, wall, event}
let pressCount = 0;  // names each press's commit (its event_id), so a refused one is known by the error
// The response being made: {id, item, row, endWall, firstAudioMs, cancelled, audioMs, heardMs, done}.
// audioMs: all its audio the server sent, played or not; heardMs: how much was heard before the user cut in.
let reply = null;
let heard = null;  // the last reply whose audio reached the page: {reply, pieces: [[start, seconds]]} (AudioContext time)
let replySamples = 0, idleTimer = null;
let conversation = afnextOwner.recalled("talk");  // the server's id of the conversation shown here ("" none yet)

// Resamples the (low-passed) microphone to RATE by linear interpolation and posts blocks of BLOCK_S;
// t is where the next output sample falls between the previous input sample (0) and this one (1).
const WORKLET = `registerProcessor("afn-capture", class extends AudioWorkletProcessor {
  constructor(o) { super(); this.step = sampleRate / o.processorOptions.rate; this.n = o.processorOptions.block;
    this.buf = new Float32Array(this.n); this.i = 0; this.t = 0; this.prev = 0; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) for (let k = 0; k < ch.length; k++) {
      const x = ch[k];
      for (; this.t <= 1; this.t += this.step) {
        this.buf[this.i++] = this.prev + (x - this.prev) * this.t;
        if (this.i === this.n) { this.port.postMessage(this.buf, [this.buf.buffer]); this.buf = new Float32Array(this.n); this.i = 0; }
      }
      this.t -= 1; this.prev = x;
    }
    return true;
  } });`;

function notice(text, fromServer) {
  const n = $(".notice");
  n.textContent = text || ""; n.hidden = !text;
  if (fromServer) n.dataset.server = "1"; else delete n.dataset.server;
}
function setState(state) {
  const el = $(".state");
  el.dataset.state = state;
  el.textContent = state === "loading" ? "loading the model…" : state;
}

function micError(err) {
  if (!window.isSecureContext || !navigator.mediaDevices)
    return "Browsers give the microphone only to pages on https or on localhost. Open this page as " +
      "http://localhost:PORT on the machine running it, or serve it over https (for example with --share).";
  if (err && (err.name === "NotAllowedError" || err.name === "SecurityError"))
    return "The browser blocked the microphone. Allow it for this site (the icon at the left of the address bar) and press Start again.";
  if (err && (err.name === "NotFoundError" || err.name === "OverconstrainedError"))
    return "No microphone was found. Plug one in (or pick one in the system settings) and press Start again.";
  if (err && err.name === "NotReadableError")
    return "The microphone is in use by another program or could not be opened. Close that program and press Start again.";
  return `The microphone could not be started (${err && err.message}).`;
}

async function start() {
  if (starting || stream) return;  // a second click while the first is still asking for the microphone
  starting = true;
  notice("");
  try {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) { notice(micError(null)); return; }
    ctx = ctx || new AudioContext({ latencyHint: "interactive" });  // in the click, before any await (Safari)
    const resumed = ctx.resume();
    let mic;
    try {
      mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 } });
    } catch (err) { notice(micError(err)); return; }
    await resumed;
    if (!workletLoaded) {
      const url = URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" }));
      await ctx.audioWorklet.addModule(url);
      workletLoaded = true;
    }
    stream = mic;
    const source = ctx.createMediaStreamSource(stream);
    worklet = new AudioWorkletNode(ctx, "afn-capture", { processorOptions: { rate: RATE, block: RATE * BLOCK_S } });
    let chain = source;
    for (let i = 0; i < 2 && ctx.sampleRate > 2 * ANTI_ALIAS_HZ; i++) {
      const lowpass = new BiquadFilterNode(ctx, { type: "lowpass", frequency: ANTI_ALIAS_HZ, Q: Math.SQRT1_2 });
      chain.connect(lowpass); chain = lowpass;
    }
    const mute = ctx.createGain(); mute.gain.value = 0;
    chain.connect(worklet); worklet.connect(mute); mute.connect(ctx.destination);  // pulled, not heard
    worklet.port.onmessage = (e) => onMic(e.data);
    $(".start").textContent = "Stop"; $(".start").classList.remove("primary");
    if (ws && live) setState("listening"); else if (!ws) connect();
  } catch (err) {
    notice(`The audio could not be started (${err && err.message}).`);
    stopMic();
  } finally {
    starting = false;
  }
}

// ---- the socket ----

async function connect() {
  const wanted = () => stream && !ws;  // Stop or New conversation while this waited: give up
  setState("connecting");
  try {
    for (;;) {  // the model may still be loading: say so and wait for it
      const health = await fetch(new URL("health", location.href), { cache: "no-store" });
      if (health.ok) break;
      const body = await health.json().catch(() => ({}));
      if (body.status !== "loading") { notice(body.reason || `The server is not ready (HTTP ${health.status}).`, true); stopMic(); return; }
      setState("loading");
      await new Promise((r) => setTimeout(r, LOAD_POLL_MS));
      if (!wanted()) return;
    }
    const answer = await fetch(new URL("afnext/token", location.href), { cache: "no-store" });
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    const { token } = await answer.json();
    if (!wanted()) return;
    const url = new URL("v1/realtime", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "?model=instruct" + (conversation ? `&conversation=${encodeURIComponent(conversation)}` : "");
    attach(new WebSocket(url, ["realtime", `afnext-page-token.${token}`, `afnext-owner.${afnextOwner.token()}`]));
  } catch (err) {
    notice(`The server could not be reached (${err && err.message}); press Start to try again.`);
    stopMic();
  }
}

function attach(socket) {  // every handler checks it is still the current socket
  ws = socket; live = false;
  socket.onmessage = (e) => { if (socket === ws) onEvent(JSON.parse(e.data)); };
  socket.onclose = (e) => {
    if (socket !== ws) return;
    ws = null; live = false;
    if (!$(".notice").dataset.server)  // a server's own sentence stays; otherwise say what happened
      notice(`The connection to the server closed${e.reason ? ` (${e.reason})` : ""}; press Start to reconnect.`);
    flushPlayback(); reply = null; heard = null; presses = [];  // that conversation is over
    stopMic();
  };
}

function send(event) {
  if (ws && ws.readyState === 1) ws.send(JSON.stringify(event));
}

function configure() {  // the turn detection the page's mode asks for; a new audio timeline on the server
  const detection = $(".ptt-mode").checked ? null  // the server decides the speaker has finished (Smart Turn)
    : { type: "semantic_vad", eagerness: "auto", create_response: true, interrupt_response: true };
  send({ type: "session.update", session: { type: "realtime", output_modalities: ["audio"],
    audio: { input: { format: { type: "audio/pcm", rate: RATE }, turn_detection: detection },
             output: { format: { type: "audio/pcm", rate: RATE } } } } });
  sent = 0; sentLog = []; kept = []; presses = [];
}

// ---- the microphone ----

function onMic(block) {
  let energy = 0;
  for (let i = 0; i < block.length; i++) energy += block[i] * block[i];
  $(".level").value = Math.min(1, Math.sqrt(energy / block.length) * 4);
  if (!live || !stream) return;  // nothing is sent before the session is ready for it
  const ptt = $(".ptt-mode").checked;
  if (ptt && !press) return;  // push-to-talk: only what is said while the button is held
  if (ptt && press.samples >= MAX_PTT_S * RATE) {
    if (!press.full) notice(`Only the first ${MAX_PTT_S} s of a press are heard.`);
    press.full = true;
    return;
  }
  send({ type: "input_audio_buffer.append", audio: toBase64(block) });
  if (ptt) { press.chunks.push(block); press.samples += block.length; }
  kept.push({ start: sent, pcm: block });
  while (kept.length && kept[0].start < sent - KEEP_S * RATE) kept.shift();
  sent += block.length;
  sentLog.push([sent / RATE, performance.now()]);
  if (sentLog.length > 3000) sentLog.splice(0, 1000);  // the last two minutes are plenty
}

function toBase64(block) {
  const pcm = new Int16Array(block.length);
  for (let i = 0; i < block.length; i++) pcm[i] = Math.max(-1, Math.min(1, block[i])) * 32767;
  const bytes = new Uint8Array(pcm.buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function fromBase64(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  return Float32Array.from(pcm, (v) => v / 32768);
}

function wallAt(seconds) {  // when the microphone audio at `seconds` on the timeline was sent
  const hit = sentLog.find(([s]) => s >= seconds);
  return hit ? hit[1] : performance.now();
}

function keptBetween(startMs, endMs) {  // the sent audio between two points of the timeline
  const a = Math.round(startMs * RATE / 1000), b = Math.round(endMs * RATE / 1000);
  const out = new Float32Array(Math.max(0, b - a));
  for (const { start, pcm } of kept) {
    const from = Math.max(a, start), to = Math.min(b, start + pcm.length);
    if (from < to) out.set(pcm.subarray(from - start, to - start), from - a);
  }
  return out;
}

// ---- the server's events ----

function onEvent(m) {
  switch (m.type) {
    case "session.created": {
      configure();
      live = true;
      const kept = m.conversation;  // absent when the server keeps nothing
      if (hadConversation && (!kept || kept.id !== conversation))
        notice("A new conversation began on the server; the assistant does not remember the earlier one.");
      hadConversation = true;
      if (kept) remember(kept.id);
      setState(stream ? "listening" : "idle");
      break;
    }
    case "input_audio_buffer.speech_started":
      speech = { start: m.audio_start_ms, end: 0 };
      if (reply || isPlaying()) bargeIn();
      break;
    case "input_audio_buffer.speech_stopped":
      speech.end = m.audio_end_ms;
      break;
    case "input_audio_buffer.committed":
      // A press is answered once the server has taken its audio: sent with the commit, a response.create
      // after a refused commit would have the assistant go on without the user (a reply to nothing).
      if (userRow()) send({ type: "response.create" });
      break;
    case "response.created":
      reply = { id: m.response.id, item: null, row: null, endWall: lastEndWall, firstAudioMs: null,
                cancelled: false, audioMs: 0, heardMs: null, done: false };
      setState("thinking");
      break;
    case "response.output_item.added":
      if (reply) reply.item = m.item.id;
      break;
    case "response.output_audio_transcript.delta": case "response.output_text.delta":
      if (reply) answerRow().querySelector(".answer").textContent += m.delta;
      break;
    case "response.reasoning_text.delta":
      if (reply) {
        const li = answerRow();
        li.querySelector("details").hidden = false;
        li.querySelector(".reasoning").textContent += m.delta;
      }
      break;
    case "response.output_audio.delta":
      if (reply && reply.id === m.response_id) {
        const samples = fromBase64(m.delta);
        reply.audioMs += 1000 * samples.length / RATE;  // summed as the server sums it, for the cut
        if (!reply.cancelled) onAudio(samples);
      }
      break;
    case "response.done":
      onDone(m);
      break;
    case "error":
      // a press whose commit was refused (too short, too many turns waiting): it will never be committed
      if (m.error && m.error.event_id) presses = presses.filter((p) => p.event !== m.error.event_id);
      if (m.error && m.error.code === "session_refused" && !live && conversation) {
        remember("");  // the conversation asked for is gone (deleted, or pruned): the next Start begins anew
        notice(`${m.error.message} Press Start for a new conversation.`, true);
      } else if (m.error && m.error.code !== "response_cancel_not_active") notice(m.error.message, true);
      break;
  }
}

let lastEndWall = null;  // when the user's latest turn ended (performance.now())

function userRow() {  // the user's turn the server committed, as a row; true if it was a press of ours
  let seconds, audio;
  const pressed = presses.shift();
  if (pressed) {  // push-to-talk: the page's own press
    audio = pressed.audio; seconds = audio.length / RATE; lastEndWall = pressed.wall;
  } else {
    audio = keptBetween(speech.start, speech.end); seconds = (speech.end - speech.start) / 1000;
    lastEndWall = wallAt(speech.end / 1000);
  }
  const li = row("user", "You:");
  li.insertAdjacentHTML("beforeend", `<span class="said"></span> <button class="replay">▶ replay</button>`);
  li.querySelector(".said").textContent = `(${seconds.toFixed(1)} s of speech)`;
  li.querySelector(".replay").addEventListener("click", () => replay(audio));
  named(li);
  return !!pressed;
}

function named(li) {  // a replay button says whose turn it plays: a screen reader lists them all as one otherwise
  const n = $(".transcript").querySelectorAll("li.user").length;
  li.querySelector(".replay").setAttribute("aria-label", `Replay your turn ${n}`);
}

function concat(chunks) {
  const out = new Float32Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out;
}

function row(kind, who) {
  const li = document.createElement("li");
  li.className = kind;
  li.innerHTML = `<span class="who"></span>`;
  li.querySelector(".who").textContent = who;
  $(".transcript").append(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function answerRow() {
  if (!reply.row) {
    reply.row = row("assistant", "Assistant:");
    reply.row.insertAdjacentHTML("beforeend", `<details hidden><summary>Reasoning</summary><span class="reasoning"></span></details><span class="answer"></span>`);
  }
  return reply.row;
}

function onAudio(samples) {
  if (reply.firstAudioMs == null) {
    if (reply.endWall != null) {
      reply.firstAudioMs = performance.now() - reply.endWall;
      root.host.dataset.firstAudioMs = reply.firstAudioMs.toFixed(0);
    }
    heard = { reply, pieces: [] };
    setState("speaking");
  }
  replySamples += samples.length;
  root.host.dataset.replySamples = String(replySamples);
  const at = play(samples, RATE);
  if (at != null && heard) heard.pieces.push([at, samples.length / RATE]);
}

function onDone(m) {
  listSoon();
  if (!reply || reply.id !== m.response.id) return;
  const done = reply; reply = null;
  done.done = true;
  if (m.response.status === "cancelled" && done.row) done.row.classList.add("interrupted");
  if (done.heardMs != null) cutToHeard(done);  // cut off while it was being made: now its whole text is here
  const t = m.timings || {};
  const s = (v) => (v == null ? "–" : `${v.toFixed(2)} s`);
  const page = done.firstAudioMs == null ? "–" : `${(done.firstAudioMs / 1000).toFixed(2)} s`;
  $(".latency").textContent = `Last turn: end of speech → turn taken ${s(t.endpoint_s)}; then first text ${s(t.ttft_s)}, ` +
    `first audio ${s(t.first_audio_s)}; end of speech → first audio in this page ${page}.`;
  clearTimeout(idleTimer);  // back to listening once the reply has played
  const left = ctx ? Math.max(0, nextPlay - ctx.currentTime) : 0;
  idleTimer = setTimeout(() => { if (!reply && ws) setState(stream ? "listening" : "idle"); }, left * 1000);
}

function isPlaying() {
  if (!ctx || !heard || !heard.pieces.length) return false;
  const [at, seconds] = heard.pieces[heard.pieces.length - 1];
  return ctx.currentTime < at + seconds;
}

function playedMs(pieces) {  // what has been heard of the pieces by now: gaps between them do not count
  let s = 0;
  for (const [at, seconds] of pieces) s += Math.max(0, Math.min(seconds, ctx.currentTime - at));
  return Math.round(1000 * s);
}

function bargeIn() {  // the user spoke over the reply: silence it, and tell the server what was heard
  if (isPlaying() && heard.reply.item) {
    const cut = heard.reply;
    cut.heardMs = playedMs(heard.pieces);
    send({ type: "conversation.item.truncate", item_id: cut.item, content_index: 0, audio_end_ms: cut.heardMs });
    if (cut.done) cutToHeard(cut);  // its text has all come: the row is cut now, else when it is done
  }
  heard = null;
  flushPlayback();
  // The reply's "done" set a timer to say "listening" once its audio had played: it is silent now.
  clearTimeout(idleTimer);
  setState(stream ? "listening" : "idle");
  if (reply) {  // its audio still on the way is not played
    reply.cancelled = true;
    if (reply.row) reply.row.classList.add("interrupted");
  }
}

// The reply's row as the server keeps it after the truncate (app/realtime_replies.py `heard`): the share
// of its audio heard is the share of its text kept, cut back to a word. Counted in code points and
// rounded half to even, as Python does, so a reload shows the same words.
function cutToHeard(r) {
  if (!r.row) return;
  r.row.classList.add("interrupted");
  const answer = r.row.querySelector(".answer"), text = Array.from(answer.textContent);
  if (r.audioMs <= 0 || r.heardMs >= r.audioMs) return;  // all of it was heard
  const exact = text.length * r.heardMs / r.audioMs;
  let cut = Math.round(exact);
  if (cut - exact === 0.5 && cut % 2) cut -= 1;
  if (cut >= text.length) return;
  const kept = text.slice(0, cut).join(""), space = kept.lastIndexOf(" ");
  answer.textContent = space < 0 ? kept : kept.slice(0, space);
}

// ---- playback ----

function play(samples, rate) {  // when the samples start playing (AudioContext time), or null
  if (!ctx || !samples.length) return null;
  const buf = ctx.createBuffer(1, samples.length, rate);
  buf.copyToChannel(samples, 0);
  const src = ctx.createBufferSource();
  src.buffer = buf;
  src.connect(ctx.destination);
  nextPlay = Math.max(nextPlay, ctx.currentTime + 0.03);  // a small cushion, then back to back
  const at = nextPlay;
  src.start(at);
  nextPlay += buf.duration;
  playing.push(src);
  src.onended = () => { playing = playing.filter((p) => p !== src); };
  return at;
}

function flushPlayback() {  // barge-in: silence at once
  playing.forEach((p) => { try { p.stop(); } catch (e) {} });
  playing = []; nextPlay = 0;
}

async function replay(samples) {
  ctx = ctx || new AudioContext();
  await ctx.resume();
  flushPlayback();
  play(samples, RATE);
}

async function replayKept(id, n) {  // a turn of a conversation kept on the server: its audio as kept
  ctx = ctx || new AudioContext();
  await ctx.resume();
  try {
    const answer = await fetch(historyUrl(`${id}/audio/${n}`), { headers: afnextOwner.headers(), cache: "no-store" });
    if (!answer.ok) throw new Error((await answer.json().catch(() => ({}))).error || `HTTP ${answer.status}`);
    const buffer = await ctx.decodeAudioData(await answer.arrayBuffer());
    flushPlayback();
    play(buffer.getChannelData(0), buffer.sampleRate);
  } catch (err) { notice(`That turn's audio could not be played (${err && err.message}).`); }
}

// ---- the history: this browser's conversations, kept by the server ----

const historyUrl = (rest) => new URL(`afnext/conversations${rest ? "/" + rest : ""}`, location.href);
let listTimer = null;

function remember(id) {
  conversation = id || "";
  afnextOwner.remember("talk", conversation);
  for (const li of root.querySelectorAll(".history li")) li.classList.toggle("open", li.dataset.id === conversation);
}

function listSoon() { clearTimeout(listTimer); listTimer = setTimeout(list, 300); }

async function request(rest, init) {  // a history request; its JSON, or an Error with the server's sentence
  const answer = await fetch(historyUrl(rest), { cache: "no-store", ...init,
    headers: { ...afnextOwner.headers(), ...(init && init.headers) } });
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(body.error || `HTTP ${answer.status}`);
  return body;
}

async function list() {
  let found;
  try { found = await request("?kind=talk"); } catch (err) { return; }  // the list is a convenience: talking goes on
  const ul = $(".history ul");
  ul.replaceChildren();
  for (const c of found.conversations) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.classList.toggle("open", c.id === conversation);
    li.innerHTML = `<span class="title"></span><button class="open">Open</button><button class="rename">Rename</button><button class="delete">Delete</button>`;
    const when = new Date(c.updated * 1000).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
    li.querySelector(".title").textContent = `${c.title} · ${c.turns} turn${c.turns === 1 ? "" : "s"} · ${when}`;
    li.querySelector(".open").addEventListener("click", () => openKept(c.id));
    li.querySelector(".rename").addEventListener("click", () => rename(c));
    li.querySelector(".delete").addEventListener("click", () => forget(c));
    for (const b of li.querySelectorAll("button"))  // "Open", "Rename", "Delete" alone tell conversations apart to no one
      b.setAttribute("aria-label", `${b.textContent} ${afnextOwner.quoted(c.title)}`);
    ul.append(li);
  }
  const mb = found.disk_bytes / 1e6;
  const n = found.conversations.length;
  $(".history .disk").textContent = `${n} conversation${n === 1 ? "" : "s"} kept, ${mb >= 0.1 ? mb.toFixed(1) + " MB" : Math.round(mb * 1000) + " kB"} of audio on disk.`;
}

async function show(id) {  // a kept conversation's transcript, as the transcript list
  const kept = await request(encodeURIComponent(id));
  $(".transcript").replaceChildren();
  let n = 0;
  for (const t of kept.turns) {
    if (t.role === "user" && !t.text && !t.audio) { n++; continue; }  // none: the assistant spoke first
    if (t.role === "user") {
      const li = row("user", "You:"), turn = n++;
      li.insertAdjacentHTML("beforeend", `<span class="said"></span>`);
      li.querySelector(".said").textContent = t.text || (t.seconds != null ? `(${t.seconds.toFixed(1)} s of speech)` : "(speech)");
      if (t.audio) {
        li.insertAdjacentHTML("beforeend", ` <button class="replay">▶ replay</button>`);
        li.querySelector(".replay").addEventListener("click", () => replayKept(id, turn));
        named(li);
      }
    } else {
      const li = row("assistant", "Assistant:");
      li.insertAdjacentHTML("beforeend", `<details hidden><summary>Reasoning</summary><span class="reasoning"></span></details><span class="answer"></span>`);
      if (t.reasoning) { li.querySelector("details").hidden = false; li.querySelector(".reasoning").textContent = t.reasoning; }
      li.querySelector(".answer").textContent = t.text;
      if (t.interrupted) li.classList.add("interrupted");
    }
  }
}

function endSocket() {  // the current conversation's socket goes; the microphone stays as it is
  const socket = ws; ws = null; live = false; hadConversation = false;
  if (socket) socket.close();
  flushPlayback(); reply = null; heard = null; presses = [];
}

async function openKept(id) {
  const wasOn = !!stream;
  endSocket(); stop();
  try { await show(id); } catch (err) { notice(err.message); remember(""); listSoon(); return; }
  remember(id); notice(""); $(".latency").textContent = "";
  if (wasOn) start();
}

async function rename(c) {
  const title = prompt("A new name for this conversation:", c.title);
  if (title == null) return;
  try { await request(encodeURIComponent(c.id), { method: "PATCH", body: JSON.stringify({ title }),
                                                  headers: { "Content-Type": "application/json" } }); }
  catch (err) { notice(err.message); }
  list();
}

async function forget(c) {
  if (!afnextOwner.confirmDelete(c.title)) return;
  try { await request(encodeURIComponent(c.id), { method: "DELETE" }); } catch (err) { notice(err.message); }
  if (c.id === conversation) { endSocket(); stop(); remember(""); $(".transcript").replaceChildren(); }
  list();
}

// ---- controls ----

function stopMic() {
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  if (worklet) { worklet.port.onmessage = null; worklet.disconnect(); worklet = null; }
  press = null;
  pttButton.classList.remove("held");
  $(".level").value = 0;
  $(".start").textContent = "Start talking"; $(".start").classList.add("primary");
  if (!reply) setState("idle");
}

function stop() {  // the microphone goes quiet; the conversation (its socket) stays
  if (press) ptt(false);
  stopMic();
  setState("idle");
}

const TOO_SHORT_PRESS = "Hold the button down while you speak; that press was too short to hear.";

function ptt(down) {
  if (!ws || !live || !stream || !$(".ptt-mode").checked) return;
  pttButton.classList.toggle("held", down);
  if (down) {
    if (reply || isPlaying()) {
      bargeIn();
      if (reply) send({ type: "response.cancel" });
    }
    send({ type: "input_audio_buffer.clear" });
    press = { chunks: [], samples: 0, full: false };
    return;
  }
  if (!press) return;
  const held = press; press = null;
  if (held.samples < MIN_PTT_S * RATE) {
    notice(TOO_SHORT_PRESS);
    send({ type: "input_audio_buffer.clear" });
    return;
  }
  if ($(".notice").textContent === TOO_SHORT_PRESS) notice("");  // this press was heard: the advice is done
  const event = `ptt_${++pressCount}`;
  presses.push({ audio: concat(held.chunks), wall: performance.now(), event });
  send({ type: "input_audio_buffer.commit", event_id: event });  // answered when the server says it is committed
}

$(".start").addEventListener("click", () => (stream ? stop() : start()));
$(".new").addEventListener("click", () => {
  const wasOn = !!stream;
  endSocket(); stop(); remember("");
  $(".transcript").replaceChildren(); $(".latency").textContent = ""; notice("");
  if (wasOn) start();
});
$(".ptt-mode").addEventListener("change", (e) => {
  $(".ptt").hidden = !e.target.checked;
  press = null;
  if (live) configure();
});
pttButton.addEventListener("pointerdown", (e) => { pttButton.setPointerCapture(e.pointerId); ptt(true); });
["pointerup", "pointercancel", "lostpointercapture"].forEach((ev) =>
  pttButton.addEventListener(ev, () => pttButton.classList.contains("held") && ptt(false)));
const typing = () => {  // Space belongs to whatever has the focus, unless that is the page or this panel
  const el = document.activeElement;
  return el && el !== document.body && el !== root.host;
};
document.addEventListener("keydown", (e) => {
  if (e.code === "Space" && !e.repeat && $(".ptt-mode").checked && stream && !typing()) { e.preventDefault(); ptt(true); }
});
document.addEventListener("keyup", (e) => { if (e.code === "Space" && pttButton.classList.contains("held")) ptt(false); });
if (!window.isSecureContext) notice(micError(null));
list();
if (conversation) show(conversation).catch(() => remember(""));  // a reload: the open conversation again
root.host.dataset.ready = "1";
