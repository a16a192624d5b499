// KotaDB search page: talks to this gateway's REST API only (same origin, relative URLs).
// Everything that comes from results is put in the page with textContent or DOM nodes, never
// as HTML. The API key lives in sessionStorage (this tab only) and is sent only to /v1/ here.
"use strict";

const KEY_SLOT = "kotadb.apiKey";
const PAGE_SIZE = 25;
const DEBOUNCE_MS = 250;

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
};

const state = { seq: 0, controller: null, nextToken: "", repos: null, current: -1 };

function apiKey() { return sessionStorage.getItem(KEY_SLOT) || ""; }

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + apiKey() };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (state.controller && method === "POST") state.controller.abort();
  const controller = new AbortController();
  if (method === "POST") state.controller = controller;
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    signal: controller.signal, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
  });
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (!response.ok) {
    const message = data && data.message ? data.message : response.status + " " + response.statusText;
    const info = data && Array.isArray(data.details) ? data.details.find((d) => String(d["@type"]).endsWith("ErrorInfo")) : null;
    const code = data && data.reason ? data.reason : info && info.reason ? info.reason : "";
    const reason = code ? " (" + code + ")" : "";
    const retry = response.headers.get("retry-after");
    throw new Error(message + reason + (retry ? " — retry in " + retry + "s" : ""));
  }
  return data;
}

function showError(message) {
  const box = $("error");
  box.hidden = !message;
  box.textContent = message || "";
}

// ---- query composition ---------------------------------------------------------------------

function composeQuery() {
  let q = $("q").value.trim();
  if (!q) return "";
  if ($("regex").checked) q = "/" + q.replace(/\//g, "\\/") + "/";
  const quote = (v) => (/[\s"]/.test(v) ? '"' + v.replace(/(["\\])/g, "\\$1") + '"' : v);
  for (const [field, id] of [["repo", "f-repo"], ["file", "f-file"], ["lang", "f-lang"]]) {
    const value = $(id).value.trim();
    if (value) q += " " + field + ":" + quote(value);
  }
  if ($("case").checked) q += " case:yes";
  return q;
}

function saveUrl() {
  const params = new URLSearchParams();
  if ($("q").value) params.set("q", $("q").value);
  if ($("mode").value !== "code") params.set("mode", $("mode").value);
  for (const id of ["case", "regex"]) if ($(id).checked) params.set(id, "1");
  for (const id of ["f-repo", "f-file", "f-lang"]) if ($(id).value) params.set(id.slice(2), $(id).value);
  history.replaceState(null, "", "/?" + params.toString());
}

// ---- search --------------------------------------------------------------------------------

let timer = 0;
function scheduleSearch() {
  clearTimeout(timer);
  timer = setTimeout(() => runSearch(false), DEBOUNCE_MS);
}

async function runSearch(more) {
  const query = composeQuery();
  if (!more) { saveUrl(); $("file").hidden = true; $("results").hidden = false; }
  if (!query) { $("results").replaceChildren(); $("status").textContent = ""; $("more").hidden = true; showError(""); return; }
  if (!apiKey()) { showError("Enter an API key (top right) to search."); return; }
  const seq = ++state.seq;
  const symbols = $("mode").value === "symbols";
  try {
    $("status").textContent = "Searching…";
    let data;
    if (symbols) {
      data = await api("POST", "/v1/symbols:search", { query: $("q").value.trim(), pageSize: 100 });
    } else {
      data = await api("POST", "/v1/code:search", {
        query, pageSize: PAGE_SIZE, contextLines: Number($("context").value),
        pageToken: more ? state.nextToken : "",
      });
    }
    if (seq !== state.seq) return; // a newer search started meanwhile
    showError("");
    if (symbols) renderSymbols(data); else renderCode(data, more);
  } catch (error) {
    if (error.name === "AbortError" || seq !== state.seq) return;
    $("status").textContent = "";
    if (!more) $("results").replaceChildren();
    $("more").hidden = true;
    showError(error.message);
  }
}

function fileLink(documentId, line) {
  return "/?doc=" + encodeURIComponent(documentId) + (line ? "#L" + line : "");
}

function highlighted(text, ranges) {
  // Ranges are in code points (startColumn/endColumn); JS strings index UTF-16 units.
  const points = Array.from(text);
  const out = document.createDocumentFragment();
  let at = 0;
  for (const r of [...(ranges || [])].sort((a, b) => a.startColumn - b.startColumn)) {
    const start = Math.max(r.startColumn || 0, at), end = Math.min(r.endColumn || 0, points.length);
    if (start >= end) continue;
    out.append(points.slice(at, start).join(""), el("mark", { text: points.slice(start, end).join("") }));
    at = end;
  }
  out.append(points.slice(at).join(""));
  return out;
}

function lineRow(kind, number, content, documentId, symbolNote) {
  const row = el("div", { class: "ln " + kind });
  row.append(el("a", { class: "no", href: fileLink(documentId, number), text: String(number) }));
  const tx = el("span", { class: "tx" });
  tx.append(content);
  row.append(tx);
  if (symbolNote) row.append(el("span", { class: "sym", text: symbolNote }));
  return row;
}

function renderCode(data, more) {
  const results = $("results");
  if (!more) { results.replaceChildren(); state.current = -1; }
  for (const file of data.fileMatches || []) {
    const box = el("div", { class: "file" });
    const head = el("div", { class: "file-head" });
    const first = (file.lineMatches || [])[0];
    head.append(el("a", { class: "path", href: fileLink(file.documentId, first && first.lineNumber), text: file.path }));
    const meta = [file.repository, file.language, file.matchCount + " matching lines"].filter(Boolean).join(" · ");
    head.append(el("span", { class: "meta", text: meta }));
    hostLink(file.repositoryId, file.path, first && first.lineNumber).then((a) => a && head.append(a));
    box.append(head);
    const lines = el("div", { class: "lines" });
    let previous = 0;
    const matches = file.lineMatches || [];
    matches.forEach((m, index) => {
      const next = index + 1 < matches.length ? matches[index + 1].lineNumber : Infinity;
      const before = m.before || [], after = (m.after || []).slice(0, Math.max(0, next - m.lineNumber - 1));
      const firstLine = m.lineNumber - before.length;
      if (previous && firstLine > previous + 1) lines.append(el("div", { class: "gap" }));
      before.forEach((text, i) => { if (firstLine + i > previous) lines.append(lineRow("ctx", firstLine + i, text, file.documentId)); });
      const sym = m.symbol && m.symbol.name ? (m.isDefinition ? "defines " : "in ") + m.symbol.kind + " " + (m.symbol.qualifiedName || m.symbol.name) : "";
      lines.append(lineRow("hit", m.lineNumber, highlighted(m.line, m.ranges), file.documentId, sym));
      after.forEach((text, i) => lines.append(lineRow("ctx", m.lineNumber + i + 1, text, file.documentId)));
      previous = m.lineNumber + after.length;
    });
    box.append(lines);
    results.append(box);
  }
  const shown = results.querySelectorAll(".file").length;
  const status = $("status");
  status.replaceChildren(
    `${data.totalMatchCount} matching lines in ${data.totalFileCount} files · showing ${shown} files · index revision ${data.indexRevision}`
  );
  if (data.limitHit) {
    status.append(" · ", el("span", { class: "limit", text: "limit hit (" + (data.limitReason || "stopped early") + "): totals are lower bounds" }));
  }
  if (!shown) status.prepend("No matches. ");
  state.nextToken = data.nextPageToken || "";
  $("more").hidden = !state.nextToken;
}

function renderSymbols(data) {
  const table = el("table", { class: "symbols" });
  for (const s of data.symbols || []) {
    const row = el("tr");
    row.append(el("td", { class: "kind", text: s.kind }));
    const name = el("td");
    name.append(el("a", { href: fileLink(s.documentId, s.startLine), text: s.qualifiedName || s.name }));
    row.append(name, el("td", { text: s.path + ":" + s.startLine }), el("td", { class: "kind", text: s.repository || "" }));
    table.append(row);
  }
  $("results").replaceChildren(table);
  $("more").hidden = true;
  $("status").textContent = `${data.totalCount} symbols${data.limitHit ? " (limit hit: lower bound)" : ""} · index revision ${data.indexRevision}`;
  if (!(data.symbols || []).length) $("status").prepend("No symbols. ");
}

// ---- repository host links ----------------------------------------------------------------

async function repositories() {
  if (state.repos === null) {
    state.repos = api("GET", "/v1/repositories?pageSize=1000").then((d) => d.repositories || []).catch(() => []);
  }
  return state.repos;
}

async function hostLink(repositoryId, path, line, lastLine) {
  if (!repositoryId) return null;
  const repo = (await repositories()).find((r) => r.id === repositoryId);
  if (!repo || !repo.lastSyncedCommit || !/^https:\/\/(github\.com|gitlab\.com)\//.test(repo.url || "")) return null;
  const base = repo.url.replace(/\.git$/, "").replace(/\/$/, "");
  const gitlab = base.startsWith("https://gitlab.com/");
  let anchor = line ? "#L" + line : "";
  if (line && lastLine && lastLine !== line) anchor += gitlab ? "-" + lastLine : "-L" + lastLine;
  const encoded = path.split("/").map(encodeURIComponent).join("/");
  const href = base + (gitlab ? "/-/blob/" : "/blob/") + repo.lastSyncedCommit + "/" + encoded + anchor;
  return el("a", { href, rel: "noopener noreferrer", target: "_blank", text: "on " + (gitlab ? "GitLab" : "GitHub") + " @ " + repo.lastSyncedCommit.slice(0, 10) });
}

// ---- file view -----------------------------------------------------------------------------

function parseAnchor() {
  const m = /^#L(\d+)(?:-L?(\d+))?$/.exec(location.hash);
  if (!m) return null;
  const a = Number(m[1]), b = Number(m[2] || m[1]);
  return [Math.min(a, b), Math.max(a, b)];
}

async function showFile(documentId) {
  $("results").hidden = true; $("more").hidden = true;
  const view = $("file");
  view.hidden = false;
  view.replaceChildren(el("p", { text: "Loading…" }));
  try {
    const doc = await api("GET", "/v1/documents/" + encodeURIComponent(documentId));
    const head = el("div", { class: "file-head" });
    head.append(el("span", { class: "path", text: doc.path }));
    head.append(el("span", { class: "meta", text: [doc.repositoryName, doc.language, "revision " + doc.revision].filter(Boolean).join(" · ") }));
    const permalink = el("a", { id: "permalink", href: "#", text: "permalink" });
    head.append(permalink);
    const back = el("a", { href: "#", text: "back to results" });
    back.addEventListener("click", (e) => { e.preventDefault(); history.back(); });
    head.append(back);
    const lines = el("div", { class: "lines" });
    const text = doc.text === undefined ? "(binary content not shown)" : doc.text;
    // A final newline ends the last line; it does not start another.
    (text.endsWith("\n") ? text.slice(0, -1) : text).split("\n").forEach((line, i) => {
      const n = i + 1;
      const row = el("div", { class: "ln", id: "L" + n });
      const no = el("a", { class: "no", href: "#L" + n, text: String(n) });
      no.addEventListener("click", (e) => {
        e.preventDefault();
        const sel = parseAnchor();
        location.hash = e.shiftKey && sel ? "#L" + Math.min(sel[0], n) + "-L" + Math.max(sel[0], n) : "#L" + n;
      });
      row.append(no, el("span", { class: "tx", text: line }));
      lines.append(row);
    });
    const box = el("div", { class: "file" }, head, lines);
    view.replaceChildren(box);
    const update = async () => {
      const sel = parseAnchor();
      for (const row of view.querySelectorAll(".ln.sel")) row.classList.remove("sel");
      if (sel) {
        for (let n = sel[0]; n <= sel[1]; n++) { const row = $("L" + n); if (row) row.classList.add("sel"); }
        const first = $("L" + sel[0]);
        if (first) first.scrollIntoView({ block: "center" });
      }
      permalink.setAttribute("href", "/?doc=" + encodeURIComponent(documentId) + "&rev=" + doc.revision + location.hash);
      const old = head.querySelector(".host"); if (old) old.remove();
      const host = await hostLink(doc.repositoryId, doc.path, sel && sel[0], sel && sel[1]);
      if (host) { host.classList.add("host"); head.append(host); }
    };
    window.onhashchange = update;
    update();
  } catch (error) {
    view.replaceChildren();
    showError(error.message);
  }
}

// ---- keys ----------------------------------------------------------------------------------

function moveMatch(step) {
  const marks = Array.from(document.querySelectorAll("#results mark"));
  if (!marks.length) return;
  if (state.current >= 0 && marks[state.current]) marks[state.current].classList.remove("current");
  state.current = (state.current + step + marks.length) % marks.length;
  marks[state.current].classList.add("current");
  marks[state.current].scrollIntoView({ block: "center" });
}

document.addEventListener("keydown", (e) => {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (e.key === "Escape" && typing) { document.activeElement.blur(); return; }
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "/") { e.preventDefault(); $("q").focus(); $("q").select(); }
  else if (e.key === "n") moveMatch(1);
  else if (e.key === "p") moveMatch(-1);
});

function showKeyState() {
  const has = Boolean(apiKey());
  $("key").hidden = has; $("key-save").hidden = has; $("key-forget").hidden = !has;
}

// ---- start ---------------------------------------------------------------------------------

function start() {
  const params = new URLSearchParams(location.search);
  $("q").value = params.get("q") || "";
  $("mode").value = params.get("mode") === "symbols" ? "symbols" : "code";
  $("case").checked = params.get("case") === "1";
  $("regex").checked = params.get("regex") === "1";
  for (const f of ["repo", "file", "lang"]) $("f-" + f).value = params.get(f) || "";
  showKeyState();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("key").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY_SLOT, value);
    $("key").value = "";
    state.repos = null;
    showKeyState();
    if (params.get("doc")) showFile(params.get("doc")); else runSearch(false);
  });
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_SLOT); state.repos = null; showKeyState(); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(timer); runSearch(false); });
  for (const id of ["q", "f-repo", "f-file", "f-lang"]) $(id).addEventListener("input", scheduleSearch);
  for (const id of ["case", "regex", "context", "mode"]) $(id).addEventListener("change", () => runSearch(false));
  $("more").addEventListener("click", () => runSearch(true));
  for (const a of document.querySelectorAll("a.example")) {
    a.addEventListener("click", (e) => { e.preventDefault(); $("q").value = a.textContent; $("regex").checked = false; runSearch(false); });
  }
  if (!apiKey()) { showError("Enter an API key (top right) to search."); return; }
  if (params.get("doc")) showFile(params.get("doc"));
  else if ($("q").value) runSearch(false);
}

start();
