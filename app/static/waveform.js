// The Recordings tab's waveform: runs as a gr.HTML js_on_load body (`element`, `props`, `watch`).
// props.value is JSON from app/recordings.py: {name, url, duration, peaks: [min0, max0, ...], parts:
// [{start, end}] (a recording over 30 minutes, heard in parts; else empty), steps: [{start, end, text,
// part}] (times in the whole recording; part: the 1-based part it came from, or null)}. The widget lives in a shadow root so Gradio's re-render of the template
// (on every value change) leaves it, and the audio element playing, alone.
// Everything a click does, the keyboard does too: the track is a slider (arrow keys seek), and each step,
// as a row and as a marker on the waveform, is a button (Enter or Space plays from it).

const host = element.querySelector(".afn-wave");
const root = host.attachShadow({ mode: "open" });
root.innerHTML = `
<style>
  :host { display: block; font: inherit; color: var(--body-text-color, #222); }
  .empty { padding: 2.5em 1em; text-align: center; opacity: .65; border: 1px dashed currentColor; border-radius: 8px; }
  .controls { display: flex; gap: .75em; align-items: center; margin-bottom: .4em; }
  button { font: inherit; cursor: pointer; border-radius: 6px; border: 1px solid #8888; background: none; color: inherit; padding: .15em .7em; }
  .time { font-variant-numeric: tabular-nums; white-space: nowrap; }  /* a long name shrinks, never the clock */
  .name { opacity: .7; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; min-width: 0; }
  .lane { position: relative; height: 96px; }
  .track { position: absolute; inset: 0; cursor: pointer; background: #8881; border-radius: 6px; overflow: hidden; }
  canvas { width: 100%; height: 100%; display: block; }
  .markers { position: absolute; inset: 0; pointer-events: none; }  /* a click between markers reaches the track */
  .playhead { position: absolute; top: 0; bottom: 0; width: 2px; background: #e4572e; pointer-events: none; }
  .marker { position: absolute; top: 0; bottom: 0; min-width: 4px; background: #f3a71240; border-left: 2px solid #f3a712;
            pointer-events: auto; cursor: pointer; }
  .track:focus-visible, .marker:focus-visible { outline: 2px solid #3b82f6; outline-offset: 1px; }
  li:focus-visible { outline: 2px solid #3b82f6; outline-offset: -2px; }  /* inside: the list's scroll box clips */
  .marker.active { background: #f3a71290; }
  .boundary { position: absolute; top: 0; bottom: 0; border-left: 1px dashed #6b7280; pointer-events: none; z-index: 1; }
  .boundary span { position: absolute; top: 2px; left: 3px; font-size: .7em; opacity: .75; white-space: nowrap; }
  li .part { opacity: .6; white-space: nowrap; font-size: .85em; }
  ol { margin: .6em 0 0; padding: 0; list-style: none; max-height: 16em; overflow-y: auto; }
  li { display: flex; gap: .75em; padding: .3em .5em; border-radius: 6px; cursor: pointer; }
  li:hover { background: #8882; }
  li.active { background: #f3a71240; }
  li .at { font-variant-numeric: tabular-nums; white-space: nowrap; color: #c77c00; }
</style>
<div class="empty">Upload a recording, or pick an example, to see its waveform here.</div>
<div class="wave" hidden>
  <div class="controls">
    <button class="play">Play</button>
    <span class="time">0:00 / 0:00</span>
    <span class="name"></span>
  </div>
  <div class="lane">
    <div class="track" title="Click, or use the arrow keys, to seek" role="slider" tabindex="0"
         aria-label="Position in the recording" aria-valuemin="0"><canvas></canvas><div class="bounds"></div></div>
    <div class="markers"></div><div class="playhead"></div>
  </div>
  <ol class="steps" aria-label="Timestamped reasoning steps"></ol>
  <audio preload="auto"></audio>
</div>`;

const $ = (sel) => root.querySelector(sel);
const audio = $("audio"), canvas = $("canvas"), track = $(".track"), playhead = $(".playhead");
let data = null;  // the parsed value
let active = -1;  // index of the step under the playhead

const clock = (s) => {
  s = Math.max(0, s || 0);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = Math.floor(s % 60);
  const mm = h ? String(m).padStart(2, "0") : String(m);
  return `${h ? h + ":" : ""}${mm}:${String(r).padStart(2, "0")}`;
};
// Under a second m:ss would say 0:00: two significant digits of a second instead, as the status line says it.
const span = (s) => (duration() < 1 ? `${Number(Math.max(0, s || 0).toPrecision(2))} s` : clock(s));
// A step's time to the tenth of a second the model gives it ("0:06.9"): m:ss alone would round 6.9 s down
// to 0:06, and a step from 0.3 s would seem to start at 0:00.
const stamp = (s) => {
  const tenths = Math.round(Math.max(0, s || 0) * 10);
  return `${clock(Math.floor(tenths / 10))}.${tenths % 10}`;
};
const stepTimes = (step) => (step.end == null ? stamp(step.start) : `${stamp(step.start)}–${stamp(step.end)}`);
const duration = () => (data && data.duration) || audio.duration || 1;

function draw() {
  if (!data) return;
  const t0 = performance.now();
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(track.clientWidth * ratio)), height = Math.round(96 * ratio);
  if (!track.clientWidth) return;  // in a hidden tab: drawn when it is shown (ResizeObserver)
  canvas.width = width; canvas.height = height;
  const g = canvas.getContext("2d"), peaks = data.peaks, columns = peaks.length / 2, mid = height / 2;
  g.clearRect(0, 0, width, height);
  g.fillStyle = "#3b82f6";
  for (let x = 0; x < width; x++) {  // each pixel column takes the extremes of the peaks under it
    const a = Math.floor((x * columns) / width), b = Math.max(a + 1, Math.floor(((x + 1) * columns) / width));
    let lo = 0, hi = 0;
    for (let i = a; i < b; i++) { lo = Math.min(lo, peaks[2 * i]); hi = Math.max(hi, peaks[2 * i + 1]); }
    const top = mid - hi * mid, bottom = mid - lo * mid;
    g.fillRect(x, top, 1, Math.max(1, bottom - top));
  }
  root.host.dataset.drawnMs = (performance.now() - t0).toFixed(1);
  root.host.dataset.duration = String(data.duration);
}

function parts() {  // where each part of a recording heard in parts begins
  const bounds = $(".bounds");
  bounds.replaceChildren();
  (data.parts || []).forEach((part, i) => {
    const line = document.createElement("div");
    line.className = "boundary";
    line.style.left = `${(100 * part.start) / duration()}%`;
    line.title = `Part ${i + 1} of ${data.parts.length}: ${clock(part.start)}–${clock(part.end)}`;
    line.innerHTML = "<span></span>";
    line.querySelector("span").textContent = `Part ${i + 1}`;
    bounds.append(line);
  });
  root.host.dataset.parts = String((data.parts || []).length);
}

// A step's row or marker as a button: focusable, named by its times and text, and Enter or Space does what a
// click does (play from the step's start).
function pressable(el, step) {
  const times = step.end == null ? `at ${stamp(step.start)}` : `${stamp(step.start)} to ${stamp(step.end)}`;
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  el.setAttribute("aria-label", `Play from the step ${times}${step.part ? ` (part ${step.part})` : ""}: ${step.text}`);
  const play = () => seek(step.start, true);
  el.addEventListener("click", play);
  el.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" && e.key !== " ") return;
    e.preventDefault();  // Space would scroll the page too
    play();
  });
}

function steps() {
  const markers = $(".markers"), list = $(".steps");
  markers.replaceChildren(); list.replaceChildren();
  (data.steps || []).forEach((step, i) => {
    const end = step.end ?? step.start;
    const marker = document.createElement("div");
    marker.className = "marker";
    // A step at the clip's very end (the model's stamps overshoot; the server clamps them to the end)
    // still shows whole: its 6 px (border and min-width) stay inside the track.
    const at = Math.min(step.start, duration()), to = Math.min(Math.max(end, at), duration());
    marker.style.left = `min(${(100 * at) / duration()}%, 100% - 6px)`;
    marker.style.width = `${(100 * (to - at)) / duration()}%`;
    marker.title = `${stepTimes(step)}: ${step.text}`;
    marker.dataset.step = i;
    pressable(marker, step);
    markers.append(marker);
    const row = document.createElement("li");
    row.dataset.step = i;
    row.innerHTML = `<span class="at"></span><span class="text"></span><span class="part"></span>`;
    row.querySelector(".at").textContent = stepTimes(step);
    row.querySelector(".text").textContent = step.text;
    row.querySelector(".part").textContent = step.part ? `part ${step.part}` : "";
    pressable(row, step);
    list.append(row);
  });
  active = -1;
  follow();
}

function seek(t, play) {
  audio.currentTime = Math.min(Math.max(0, t), duration());
  follow();
  if (play) audio.play().catch(() => {});
}

function follow() {  // playhead, clock, and the highlighted step
  const t = audio.currentTime || 0;
  playhead.style.left = `${(100 * t) / duration()}%`;
  $(".time").textContent = `${span(t)} / ${span(duration())}`;
  track.setAttribute("aria-valuemax", String(duration()));
  track.setAttribute("aria-valuenow", t.toFixed(1));
  track.setAttribute("aria-valuetext", `${span(t)} of ${span(duration())}`);
  const list = (data && data.steps) || [];
  let now = -1;
  list.forEach((s, i) => { if (t >= s.start - 0.05 && t <= Math.max(s.end ?? s.start + 2, s.start + 0.5)) now = i; });
  if (now !== active) {
    active = now;
    root.querySelectorAll(".active").forEach((el) => el.classList.remove("active"));
    root.querySelectorAll(`[data-step="${now}"]`).forEach((el) => el.classList.add("active"));
    if (now >= 0) root.querySelector(`li[data-step="${now}"]`)?.scrollIntoView({ block: "nearest" });
    root.host.dataset.activeStep = String(now);
  }
}

function render() {
  let next = null;
  try { next = props.value ? JSON.parse(props.value) : null; } catch (e) { next = null; }
  data = next;
  // In time order: a recording heard in parts gets its parts' steps as they come, interleaved.
  if (data && Array.isArray(data.steps)) data.steps.sort((a, b) => a.start - b.start);
  $(".empty").hidden = !!data;
  $(".wave").hidden = !data;
  // No recording (deleted, or gone from the server): removing src alone would let it play on, unstoppable.
  if (!data) { audio.pause(); audio.removeAttribute("src"); return; }
  if (audio.getAttribute("src") !== data.url) { audio.src = data.url; }
  $(".name").textContent = data.name;
  draw();
  parts();
  steps();
}

$(".play").addEventListener("click", () => (audio.paused ? audio.play().catch(() => {}) : audio.pause()));
// One sound at a time: the recording pauses any other player on the page (the spoken answer: Gradio's player
// keeps its <audio> in a shadow root, and a media element's "play" does not leave one, so each is looked for).
function pauseOthers(node = document) {
  for (const el of node.querySelectorAll("*")) {
    if (el instanceof HTMLMediaElement && el !== audio && !el.paused) el.pause();
    if (el.shadowRoot && el.shadowRoot !== root) pauseOthers(el.shadowRoot);
  }
}
audio.addEventListener("play", () => { $(".play").textContent = "Pause"; pauseOthers(); tick(); });
audio.addEventListener("pause", () => ($(".play").textContent = "Play"));
document.addEventListener("afnext-pause-recording", () => audio.pause());  // Speak the answer (recordings.js)
audio.addEventListener("timeupdate", follow);
audio.addEventListener("seeked", follow);
track.addEventListener("click", (e) => {
  const box = track.getBoundingClientRect();
  seek(((e.clientX - box.left) / box.width) * duration(), !audio.paused);
});
const SEEK_KEYS = { ArrowLeft: -5, ArrowDown: -5, ArrowRight: 5, ArrowUp: 5, PageDown: -30, PageUp: 30 };  // seconds
track.addEventListener("keydown", (e) => {  // the slider's keys; like a click, they leave playing or paused as it was
  const t = audio.currentTime || 0;
  const to = e.key === "Home" ? 0 : e.key === "End" ? duration() : e.key in SEEK_KEYS ? t + SEEK_KEYS[e.key] : null;
  if (to === null) return;
  e.preventDefault();  // the arrows would scroll the page too
  seek(to, !audio.paused);
});
function tick() { follow(); if (!audio.paused) requestAnimationFrame(tick); }
new ResizeObserver(draw).observe(track);
watch("value", render);
render();
