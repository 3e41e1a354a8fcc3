// Whose conversations this browser holds: an owner token made here once and kept in localStorage
// (the server keeps only a hash of it), sent with every history request and voice socket; and which
// conversation each tab had open, so a reload opens it again; and the question asked before one is
// deleted, the same in both tabs. Loaded in the page's <head>.
window.afnextOwner = (() => {
  const TOKEN = "afnext-owner", OPEN = "afnext-open-";
  const fresh = () => {  // 32 random bytes as hex: crypto.getRandomValues works on plain http too
    const bytes = new Uint8Array(32);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  };
  const store = (() => { try { return window.localStorage; } catch (e) { return null; } })();  // blocked: none
  let memory = null;  // without storage the token lives as long as the page
  return {
    token() {
      let t = store ? store.getItem(TOKEN) : memory;
      if (!t || !/^[0-9a-f]{64}$/.test(t)) {
        t = fresh();
        if (store) store.setItem(TOKEN, t); else memory = t;
      }
      return t;
    },
    remember(kind, id) { if (store) { if (id) store.setItem(OPEN + kind, id); else store.removeItem(OPEN + kind); } },
    recalled(kind) { return (store && store.getItem(OPEN + kind)) || ""; },
    headers() { return { "X-AFNext-Owner": this.token() }; },
    // A title in quotes, unless it is quoted already (a voice conversation's first answer, “…”).
    quoted(title) { return /^(\u201c[^]*\u201d|"[^]*"|\u00ab[^]*\u00bb)$/.test(title) ? title : `"${title}"`; },
    confirmDelete(title) {
      return window.confirm(`Delete ${this.quoted(title)} and its audio? This cannot be undone.`);
    },
  };
})();
