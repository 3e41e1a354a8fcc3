// The Talk tab: runs as a gr.HTML js_on_load body (`element`). Streams the microphone to the
// server's voice channel (app/talk.py, which documents the protocol), plays the reply gaplessly with
// Web Audio, and keeps the transcript. Lives in a shadow root, out of Gradio's re-rendering.

const host = element.querySelector(".afn-talk");
const root = host.attachShadow({ mode: "open" });
root.innerHTML = `
<style>
  :host { display: block; font: inherit; color: var(--body-text-color, #222); }
  .bar { display: flex; flex-wrap: wrap; gap: .75em; align-items: center; }
  button { font: inherit; cursor: pointer; border-radius: 8px; border: 1px solid #8888; background: none; color: inherit; padding: .4em 1em; }
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
  li { padding: .45em .7em; margin: .3em 0; border-radius: 8px; }
  li.user { background: #8881; } li.assistant { background: #3b82f614; }
  li .who { font-weight: 600; margin-right: .5em; }
  li.interrupted .answer::after { content: " — interrupted"; opacity: .6; font-style: italic; }
  details { opacity: .75; font-size: .92em; }
</style>
<div class="bar">
  <button class="start primary">Start talking</button>
  <label><input type="checkbox" class="ptt-mode"> Push-to-talk</label>
  <button class="ptt" hidden>Hold to talk (or hold Space)</button>
  <button class="new">New conversation</button>
  <meter class="level" min="0" max="1" value="0" title="Microphone level"></meter>
  <span class="state" data-state="idle" aria-live="polite">idle</span>
</div>
<div class="notice" role="alert" hidden></div>
<div class="latency"></div>
<ol class="transcript"></ol>`;

const $ = (sel) => root.querySelector(sel);
const pttButton = $(".ptt");
const BLOCK_S = 0.02;  // microphone audio per message
const SEND_RATE = 16000;  // Hz sent upstream: the model's rate, a third of 48 kHz's bandwidth
const ANTI_ALIAS_HZ = 7000;  // two low-pass biquads before the worklet's resampler (speech ends well below 8 kHz)
const HEADER_BYTES = 12, USER_AUDIO = 2;  // app/talk.py: kind 1 is reply speech, kind 2 the user's own turn
const randomId = () => Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

let client = randomId();  // names this page's conversation on the server
let ctx = null, stream = null, ws = null, worklet = null, workletLoaded = false;
let starting = false;  // between the Start click and the microphone being on
let live = false;  // the server said "ready" on the current socket
let sent = 0;  // microphone samples sent
let sentLog = [];  // [seconds of microphone audio sent, performance.now()] to time "end of speech"
let nextPlay = 0, playing = [];  // gapless reply playback
const turns = new Map();  // id → {user, assistant, endWall, firstAudioMs, userAudio}
let replySamples = 0;

// Resamples the (low-passed) microphone to SEND_RATE by linear interpolation and posts blocks of
// BLOCK_S; t is where the next output sample falls between the previous input sample (0) and this one (1).
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
function setState(state, waiting) {
  const el = $(".state");
  el.dataset.state = state;
  el.textContent = state === "thinking" && waiting ? `waiting for the GPU (${waiting} ahead)`
    : state === "loading" ? "loading the model…" : state;
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
    worklet = new AudioWorkletNode(ctx, "afn-capture", { processorOptions: { rate: SEND_RATE, block: SEND_RATE * BLOCK_S } });
    let chain = source;
    for (let i = 0; i < 2 && ctx.sampleRate > SEND_RATE; i++) {
      const lowpass = new BiquadFilterNode(ctx, { type: "lowpass", frequency: ANTI_ALIAS_HZ, Q: Math.SQRT1_2 });
      chain.connect(lowpass); chain = lowpass;
    }
    const mute = ctx.createGain(); mute.gain.value = 0;
    chain.connect(worklet); worklet.connect(mute); mute.connect(ctx.destination);  // pulled, not heard
    worklet.port.onmessage = (e) => onMic(e.data);
    connect();
    $(".start").textContent = "Stop"; $(".start").classList.remove("primary");
  } catch (err) {
    notice(`The audio could not be started (${err && err.message}).`);
    stop();
  } finally {
    starting = false;
  }
}

function connect() {
  const url = new URL("afnext/talk", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = `?client=${client}`;
  const socket = new WebSocket(url);  // every handler checks it is still the current one
  ws = socket; live = false;
  socket.binaryType = "arraybuffer";
  sent = 0; sentLog = [];
  socket.onopen = () => {
    socket.send(JSON.stringify({ type: "hello", sample_rate: SEND_RATE, play_rate: ctx.sampleRate }));
    socket.send(JSON.stringify({ type: "mode", ptt: $(".ptt-mode").checked }));
  };
  socket.onmessage = (e) => {
    if (socket !== ws) return;
    if (typeof e.data === "string") onEvent(JSON.parse(e.data)); else onAudio(e.data);
  };
  socket.onclose = (e) => {
    if (socket !== ws) return;
    if (!$(".notice").dataset.server)  // a server's own sentence stays; otherwise say what happened
      notice(`The connection to the server closed${e.reason ? ` (${e.reason})` : ""}; press Start to reconnect.`);
    stop();
  };
}

function stop() {
  const socket = ws; ws = null; live = false;
  if (socket && socket.readyState <= 1) socket.close();
  if (stream) stream.getTracks().forEach((t) => t.stop());
  stream = null;
  if (worklet) { worklet.port.onmessage = null; worklet.disconnect(); worklet = null; }
  if (pttButton.classList.contains("held")) pttButton.classList.remove("held");
  flushPlayback();
  setState("idle");
  $(".level").value = 0;
  $(".start").textContent = "Start talking"; $(".start").classList.add("primary");
}

function onMic(block) {
  let energy = 0;
  for (let i = 0; i < block.length; i++) energy += block[i] * block[i];
  $(".level").value = Math.min(1, Math.sqrt(energy / block.length) * 4);
  if (!ws || ws.readyState !== 1 || !live) return;  // nothing is sent before the server is ready for it
  const pcm = new Int16Array(block.length);
  for (let i = 0; i < block.length; i++) pcm[i] = Math.max(-1, Math.min(1, block[i])) * 32767;
  ws.send(pcm.buffer);
  sent += block.length;
  sentLog.push([sent / SEND_RATE, performance.now()]);
  if (sentLog.length > 3000) sentLog.splice(0, 1000);  // the last minute is plenty
}

function wallAt(seconds) {  // when the microphone audio at `seconds` was captured (≈ sent)
  const hit = sentLog.find(([s]) => s >= seconds);
  return hit ? hit[1] : performance.now();
}

function turn(id) {
  if (!turns.has(id)) turns.set(id, { user: null, assistant: null, endWall: null, firstAudioMs: null, userAudio: null });
  return turns.get(id);
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

function assistantRow(id) {
  const t = turn(id);
  if (!t.assistant) {
    t.assistant = row("assistant", "Assistant:");
    t.assistant.insertAdjacentHTML("beforeend", `<details hidden><summary>Reasoning</summary><span class="reasoning"></span></details><span class="answer"></span>`);
  }
  return t.assistant;
}

function onEvent(m) {
  if (m.type === "ready") {
    live = true;
    setState("listening");
    const seen = Math.max(0, ...turns.keys());
    if (m.turns < seen) {  // the server let this conversation go (idle too long): a new one starts
      turns.clear();
      notice("The earlier conversation had expired on the server; the assistant starts afresh.");
    }
  }
  else if (m.type === "state") setState(m.state, m.waiting);
  else if (m.type === "user_turn") {
    const t = turn(m.id);
    t.endWall = wallAt(m.end);
    t.user = row("user", "You:");
    t.user.dataset.turn = m.id;
    t.user.insertAdjacentHTML("beforeend", `<span class="said"></span> <button class="replay" disabled>▶ replay</button>`);
    t.user.querySelector(".said").textContent = `(${(m.end - m.start).toFixed(1)} s of speech)`;
    t.user.querySelector(".replay").addEventListener("click", () => replay(m.id));
  } else if (m.type === "text" || m.type === "reasoning") {
    const li = assistantRow(m.id);
    if (m.type === "text") li.querySelector(".answer").textContent += m.text;
    else { li.querySelector("details").hidden = false; li.querySelector(".reasoning").textContent += m.text; }
  } else if (m.type === "interrupted") {
    flushPlayback();
    if (turns.get(m.id)?.assistant) turns.get(m.id).assistant.classList.add("interrupted");
  } else if (m.type === "turn_done") {
    const t = turn(m.id);
    const s = (v) => (v == null ? "–" : `${v.toFixed(2)} s`);
    const page = t.firstAudioMs == null ? "–" : `${(t.firstAudioMs / 1000).toFixed(2)} s`;
    $(".latency").textContent = `Last turn: end of speech → turn taken ${s(m.endpoint_s)}; then first text ${s(m.ttft_s)}, ` +
      `first audio ${s(m.first_audio_s)}; end of speech → first audio in this page ${page}.`;
  } else if (m.type === "error") notice(m.message, true);
  else if (m.type === "notice") notice(m.message);
}

function onAudio(buffer) {
  const view = new DataView(buffer);
  const kind = view.getUint8(0), id = view.getUint32(4, true), rate = view.getUint32(8, true);
  const pcm = new Int16Array(buffer, HEADER_BYTES);
  const samples = Float32Array.from(pcm, (v) => v / 32768);
  if (kind === USER_AUDIO) {
    const t = turn(id);
    t.userAudio = { rate, samples };
    t.user?.querySelector(".replay")?.removeAttribute("disabled");
    return;
  }
  const t = turn(id);
  if (t.firstAudioMs == null && t.endWall != null) {
    t.firstAudioMs = performance.now() - t.endWall;
    root.host.dataset.firstAudioMs = t.firstAudioMs.toFixed(0);
  }
  replySamples += samples.length;
  root.host.dataset.replySamples = String(replySamples);
  play(samples, rate);
}

function play(samples, rate) {
  if (!ctx || !samples.length) return;
  const buf = ctx.createBuffer(1, samples.length, rate);
  buf.copyToChannel(samples, 0);
  const src = ctx.createBufferSource();
  src.buffer = buf;
  src.connect(ctx.destination);
  nextPlay = Math.max(nextPlay, ctx.currentTime + 0.03);  // a small cushion, then back to back
  src.start(nextPlay);
  nextPlay += buf.duration;
  playing.push(src);
  src.onended = () => { playing = playing.filter((s) => s !== src); };
}

function flushPlayback() {  // barge-in: silence at once
  playing.forEach((s) => { try { s.stop(); } catch (e) {} });
  playing = []; nextPlay = 0;
}

async function replay(id) {
  const audio = turns.get(id)?.userAudio;
  if (!audio) return;
  ctx = ctx || new AudioContext();
  await ctx.resume();
  flushPlayback();
  play(audio.samples, audio.rate);
}

function ptt(down) {
  if (!ws || !live || !$(".ptt-mode").checked) return;
  if (down) flushPlayback();
  $(".ptt").classList.toggle("held", down);
  ws.send(JSON.stringify({ type: "ptt", down }));
}

$(".start").addEventListener("click", () => (stream ? stop() : start()));
$(".new").addEventListener("click", () => {
  const wasOn = !!stream;
  stop(); client = randomId(); turns.clear(); $(".transcript").replaceChildren(); $(".latency").textContent = "";
  if (wasOn) start();
});
$(".ptt-mode").addEventListener("change", (e) => {
  $(".ptt").hidden = !e.target.checked;
  if (ws && ws.readyState === 1) ws.send(JSON.stringify({ type: "mode", ptt: e.target.checked }));
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
root.host.dataset.ready = "1";
