// Which replica serves this browser when the app runs as several (python -m app --replicas N): Ray
// Serve's proxy sends requests with the same x-session-id header to the same replica, so every request
// the page makes to its own site carries this browser's affinity id (made once, kept in localStorage;
// not the owner token, which never leaves in a header the proxy logs). One process ignores the header.
// Loaded in the page's <head>, before Gradio's scripts keep a reference to fetch.
(() => {
  const KEY = "afnext-affinity", HEADER = "x-session-id";
  const fresh = () => {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  };
  let id = null;
  try { id = window.localStorage.getItem(KEY); } catch (e) { /* storage blocked: this page's own id */ }
  if (!id || !/^[0-9a-f]{32}$/.test(id)) {
    id = fresh();
    try { window.localStorage.setItem(KEY, id); } catch (e) { /* kept for this page only */ }
  }
  window.afnextAffinity = id;
  const sameSite = (url) => {
    try { return new URL(url, window.location.href).origin === window.location.origin; } catch (e) { return false; }
  };
  const original = window.fetch.bind(window);
  window.fetch = (resource, init) => {
    const url = resource instanceof Request ? resource.url : String(resource);
    if (!sameSite(url)) return original(resource, init);
    if (resource instanceof Request && !(init && init.headers)) {
      const request = new Request(resource);
      if (!request.headers.has(HEADER)) request.headers.set(HEADER, id);
      return original(request, init);
    }
    const headers = new Headers((init && init.headers) || (resource instanceof Request ? resource.headers : undefined));
    if (!headers.has(HEADER)) headers.set(HEADER, id);
    return original(resource, { ...(init || {}), headers });
  };
})();
