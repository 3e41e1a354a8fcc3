// The Recordings tab's helpers in the browser (app/recordings_tab.py wires them in). The question box while an answer
// streams: Gradio runs one ask at a time and drops an Enter or a click on Ask that comes meanwhile, so a new
// question typed then waits here, the page says so under the box, and it is sent (a click on Ask) once the
// answer is done. The Think box, kept in localStorage as the open recording is (owner.js). And the
// browser's way of writing a date and time, for the list of recordings. Loaded in the page's <head>.
window.afnextRecordings = (() => {
  const THINK = "afnext-think";
  const WAITING = "Your question is sent when this answer is done.";
  let started = 0, ended = 0;  // asks begun and ended (done, failed or cut off) in this page
  let asked = "";  // the question being answered
  let waiting = false;  // a question waits in the box for the answer to end
  const box = () => document.querySelector("#afn-question textarea");
  return {
    // Every Enter or click on Ask comes here first: the note for the line under the box, or undefined to
    // leave it. The question being answered again (Enter and a click at once) or an empty box waits for nothing.
    pressed(question) {
      const text = (question || "").trim();
      if (started === ended || !text || text === asked) return undefined;
      waiting = true;
      return WAITING;
    },
    started(question) { started += 1; asked = (question || "").trim(); },
    // After each ask ends: the waiting question is sent if the box still holds one (the server empties the
    // note when it takes it); else the note goes.
    ended() {
      ended += 1;
      const send = waiting && box() && box().value.trim();
      waiting = false;
      if (!send) return "";
      setTimeout(() => document.querySelector("#afn-ask")?.click(), 0);  // once Gradio has let the last ask go
      return undefined;
    },
    // Speak the answer: the waveform's recording (waveform.js listens for this) stops playing under it.
    pausePlayback() { document.dispatchEvent(new Event("afnext-pause-recording")); },
    // Another recording opened: a question waiting for the old one's answer is not sent to it.
    forget() { waiting = false; },
    think() { try { return localStorage.getItem(THINK) === "1"; } catch (e) { return false; } },  // blocked: off
    keepThink(on) { try { localStorage.setItem(THINK, on ? "1" : "0"); } catch (e) { /* kept for this page only */ } },
    // The browser's short date and time, as the Talk tab's list writes them (toLocaleString, dateStyle and
    // timeStyle "short"), for the server to fill in: a pattern of {M} {MM} {d} {dd} {yy} {yyyy} {h} {hh} {mm}
    // {a}, the words for a.m. and p.m., and the time zone; "" where a part is written otherwise (other
    // digits, a month's name), and the server writes its own format.
    clock() {
      const format = new Intl.DateTimeFormat([], { dateStyle: "short", timeStyle: "short" });
      const parts = (hour) => format.formatToParts(new Date(2001, 1, 3, hour, 5));  // 3 Feb 2001, 04:05 / 16:05
      const names = { month: { 2: "{M}", "02": "{MM}" }, day: { 3: "{d}", "03": "{dd}" },
                      year: { "01": "{yy}", 2001: "{yyyy}" }, hour: { 4: "{h}", "04": "{hh}" }, minute: { "05": "{mm}" } };
      let pattern = "";
      for (const part of parts(4)) {
        if (part.type === "literal") pattern += part.value.replace(/[{}]/g, "");
        else if (part.type === "dayPeriod") pattern += "{a}";
        else if (names[part.type] && names[part.type][part.value]) pattern += names[part.type][part.value];
        else return "";
      }
      const period = (hour) => (parts(hour).find((part) => part.type === "dayPeriod") || {}).value || "";
      return JSON.stringify({ pattern, am: period(4), pm: period(16), zone: format.resolvedOptions().timeZone });
    },
  };
})();
