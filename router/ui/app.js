// exo-router's page: a streaming chat over /v1/chat/completions and a live cluster view over
// /v1/cluster/events. No framework, no build step: the router embeds this file as it is.
// The API key (when the router asks for one) is kept in localStorage and sent as a Bearer token.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "exo-router-api-key";
const state = { history: [], controller: null, model: null, keyWaiters: [] };

/** Builds an element: el("div", {class: "x"}, "text", child, ...). Text is never parsed as HTML. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// ---------- API key ----------

function authHeaders() {
  const key = localStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Asks for a key (once, however many requests were refused) and resolves when the dialog closes. */
function askForKey() {
  return new Promise((resolve) => {
    state.keyWaiters.push(resolve);
    const dialog = $("key-dialog");
    if (!dialog.open) {
      $("key-input").value = localStorage.getItem(KEY_STORE) || "";
      dialog.showModal();
    }
  });
}

function setupKeyDialog() {
  const dialog = $("key-dialog");
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "save") {
      const key = $("key-input").value.trim();
      if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    }
    const waiters = state.keyWaiters.splice(0);
    waiters.forEach((w) => w(dialog.returnValue === "save"));
  });
  $("key-button").addEventListener("click", () => askForKey().then(() => connectCluster()));
}

/** fetch() with the key; a 401 asks for a key and tries once more. */
async function keyedFetch(url, init = {}) {
  const go = () => fetch(url, { ...init, headers: { ...(init.headers || {}), ...authHeaders() } });
  let res = await go();
  if (res.status === 401 && (await askForKey())) res = await go();
  return res;
}

// ---------- server-sent events ----------

/** Reads an SSE body, calling onEvent(eventName, data) per event, until it ends or is aborted. */
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// ---------- markdown ----------

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

/** Inline markdown on already-escaped text: code, bold, italics, http(s) links. */
function inline(s) {
  const codes = [];
  s = s.replace(/`([^`]+)`/g, (_, c) => { codes.push(c); return `\u0000${codes.length - 1}\u0000`; });
  s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
}

/** A small markdown renderer: fenced code, headings, lists, paragraphs. The text is escaped first,
 *  so nothing the model writes becomes markup of its own. */
function markdown(text) {
  const out = [];
  const parts = escapeHtml(text).split(/^```[^\n]*\n?/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) { out.push(`<pre><code>${part.replace(/\n$/, "")}</code></pre>`); return; }
    let list = null;
    const closeList = () => { if (list) { out.push(`</${list}>`); list = null; } };
    let para = [];
    const closePara = () => { if (para.length) { out.push(`<p>${inline(para.join("<br>"))}</p>`); para = []; } };
    for (const line of part.split("\n")) {
      const h = line.match(/^(#{1,3})\s+(.*)$/);
      const ul = line.match(/^\s*[-*]\s+(.*)$/);
      const ol = line.match(/^\s*(\d{1,9})[.)]\s+(.*)$/);
      // A blank line ends a paragraph; a list goes on across blank lines between its items.
      if (h) { closePara(); closeList(); out.push(`<h${h[1].length}>${inline(h[2])}</h${h[1].length}>`); }
      else if (ul || ol) {
        closePara();
        const kind = ul ? "ul" : "ol";
        if (list !== kind) {
          closeList();
          const start = ol && ol[1] !== "1" ? ` start="${ol[1]}"` : "";
          out.push(`<${kind}${start}>`);
          list = kind;
        }
        out.push(`<li>${inline((ul || ol)[ul ? 1 : 2])}</li>`);
      } else if (!line.trim()) { closePara(); }
      else { closeList(); para.push(line); }
    }
    closePara(); closeList();
  });
  return out.join("");
}

// ---------- chat ----------

function scrollToEnd() {
  const m = $("messages");
  m.scrollTop = m.scrollHeight;
}

function addUserMessage(text) {
  $("empty")?.remove();
  $("messages").append(el("div", { class: "msg user" }, text));
}

function fmtMs(ms) { return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`; }

/** The line under an answer: time to first token, speed, tokens, and the nodes it ran on. */
function metaLine(m) {
  const items = [];
  if (m.ttft !== undefined) items.push(el("span", { class: "ttft" }, `TTFT ${fmtMs(m.ttft)}`));
  if (m.tokS !== undefined) items.push(el("span", { class: "speed" }, `${m.tokS.toFixed(1)} tok/s`));
  if (m.tokens !== undefined) items.push(el("span", { class: "tokens" }, `${m.tokens} tokens`));
  if (m.prefill) {
    const route = m.prefill === m.decode
      ? [el("b", { class: "pre" }, m.prefill), " (prefill + decode)"]
      : [el("b", { class: "pre" }, m.prefill), " → ", el("b", { class: "dec" }, m.decode)];
    items.push(el("span", { class: "route" }, ...route));
  }
  if (m.finish && m.finish !== "stop") items.push(el("span", {}, `finish: ${m.finish}`));
  return items;
}

/** The model to name: the cluster view's, else the first /v1/models lists. */
async function currentModel() {
  if (state.model) return state.model;
  const res = await keyedFetch("/v1/models");
  const list = await res.json().catch(() => ({}));
  state.model = list.data?.[0]?.id || null;
  return state.model;
}

function setSending(sending) {
  const b = $("send");
  b.textContent = sending ? "Stop" : "Send";
  b.classList.toggle("stop", sending);
}

async function send(text, params = {}) {
  if (state.controller) return;
  addUserMessage(text);
  state.history.push({ role: "user", content: text });
  const body = el("div", { class: "body" });
  const meta = el("div", { class: "meta" });
  const msg = el("div", { class: "msg assistant", "data-state": "waiting" }, body, meta);
  $("messages").append(msg);
  scrollToEnd();
  const controller = new AbortController();
  state.controller = controller;
  setSending(true);
  const started = performance.now();
  const m = {};
  let answer = "";
  let firstAt = null;
  let chunks = 0;
  const render = () => {
    body.innerHTML = markdown(answer);
    meta.replaceChildren(...metaLine(m));
    scrollToEnd();
  };
  try {
    const res = await keyedFetch("/v1/chat/completions", {
      method: "POST",
      signal: controller.signal,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: await currentModel(), messages: state.history, stream: true,
        stream_options: { include_usage: true }, ...params,
      }),
    });
    m.prefill = res.headers.get("x-exo-prefill-node");
    m.decode = res.headers.get("x-exo-decode-node");
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error(err.error?.message || `${res.status} ${res.statusText}`);
    }
    msg.dataset.state = "streaming";
    await readEvents(res.body, (_, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
      const choice = chunk.choices?.[0];
      const delta = choice?.delta?.content || "";
      if (delta) {
        if (firstAt === null) { firstAt = performance.now(); m.ttft = firstAt - started; }
        chunks += 1;
        answer += delta;
      }
      if (choice?.finish_reason) m.finish = choice.finish_reason;
      if (chunk.usage) m.tokens = chunk.usage.completion_tokens;
      const n = m.tokens ?? chunks;
      if (firstAt !== null && n > 1) m.tokS = (n - 1) / ((performance.now() - firstAt) / 1000);
      render();
    });
    msg.dataset.state = "done";
    state.history.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      msg.dataset.state = "stopped";
      m.finish = "stopped";
      if (answer) state.history.push({ role: "assistant", content: answer });
    } else {
      msg.dataset.state = "error";
      state.history.pop();
      meta.append(el("span", { class: "error-text" }, e.message));
    }
  } finally {
    if (msg.dataset.state !== "error") render();
    state.controller = null;
    setSending(false);
  }
}

function setupChat() {
  const prompt = $("prompt");
  const grow = () => { prompt.style.height = "auto"; prompt.style.height = `${prompt.scrollHeight}px`; };
  prompt.addEventListener("input", grow);
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.controller) { state.controller.abort(); return; }
    const text = prompt.value.trim();
    if (!text) return;
    prompt.value = "";
    grow();
    send(text);
  });
  $("new-chat").addEventListener("click", () => {
    state.controller?.abort();
    state.history = [];
    $("messages").replaceChildren(el("div", { class: "empty", id: "empty" },
      el("h1", {}, "Ask the cluster"), el("p", {}, "A new conversation.")));
  });
}

// ---------- cluster view ----------

function fmtBytes(b) {
  if (!b) return "?";
  const gib = b / 2 ** 30;
  return gib >= 1 ? `${gib.toFixed(gib >= 10 ? 0 : 1)} GiB` : `${Math.round(b / 2 ** 20)} MiB`;
}
function fmtMB(b) { return b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB` : `${(b / 1e6).toFixed(1)} MB`; }
function fmtNum(n) { return n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e4 ? `${(n / 1e3).toFixed(1)}k` : String(n); }
function fmtRate(r) { return r >= 100 ? r.toFixed(0) : r.toFixed(1); }

function nodeCard(n) {
  const hw = n.hardware;
  let where = "not contacted";
  if (hw) {
    where = hw.gpu
      ? [el("span", { class: "gpu" }, hw.gpu), ` · ${hw.gpu_layers}/${hw.n_layer} layers`]
      : [el("span", { class: "gpu" }, "CPU"), ` · ${hw.cpu_threads} threads`];
  }
  const mem = hw ? ` · ${fmtBytes(hw.memory_bytes)} · ${hw.os}/${hw.arch}` : "";
  const used = n.slots ? Math.round((100 * n.slots_in_use) / n.slots) : 0;
  return el("article", { class: `node ${n.role}${n.healthy ? "" : " down"}`, "data-node": n.name },
    el("div", { class: "node-head" },
      el("span", { class: "dot", title: n.healthy ? "up" : "down" }),
      el("span", { class: "node-name" }, n.name),
      n.origin === "discovered" ? el("span", { class: "role", title: "found on the LAN" }, "LAN") : null,
      el("span", { class: "role" }, n.role)),
    el("div", { class: "hw" }, where, mem),
    el("div", { class: "bar-line", title: `${n.slots_in_use} of ${n.slots} slots in use` },
      el("span", { style: `width:${used}%` })),
    el("div", { class: "node-grid" },
      el("span", {}, "slots in use"), el("span", { class: "v" }, `${n.slots_in_use} / ${n.slots}`),
      el("span", {}, "requests"), el("span", { class: "v" }, n.in_flight),
      el("span", {}, "prefill tok/s"), el("span", { class: "v" }, fmtRate(n.prefill_tok_s)),
      el("span", {}, "decode tok/s"), el("span", { class: "v" }, fmtRate(n.decode_tok_s)),
      n.prefill_backlog_tokens ? [el("span", {}, "prompt backlog"), el("span", { class: "v" }, fmtNum(n.prefill_backlog_tokens))] : null),
    n.error ? el("div", { class: "why" }, n.error) : null,
    el("div", { class: "addr" }, n.model ? `${n.model} · ` : "", n.address, n.version ? ` · v${n.version}` : ""));
}

function stat(value, key) {
  return el("div", { class: "stat" }, el("div", { class: "v" }, value), el("div", { class: "k" }, key));
}

/** The model picker, shown when the cluster serves several models; the chat uses its choice. */
function renderModels(s) {
  const models = s.models?.length ? s.models : [s.model];
  if (!models.includes(state.model)) state.model = models[0];
  const pick = $("model-pick");
  const several = models.length > 1;
  pick.hidden = !several;
  $("model-chip").hidden = several;
  $("model-chip").textContent = s.model;
  const shown = [...pick.options].map((o) => o.value);
  if (shown.join("\n") !== models.join("\n")) {
    pick.replaceChildren(...models.map((m) => el("option", { value: m }, m)));
  }
  pick.value = state.model;
}

function renderCluster(s) {
  renderModels(s);
  const chip = $("state-chip");
  chip.dataset.state = s.ready ? "ready" : "unavailable";
  chip.textContent = s.ready ? "ready" : "unavailable";
  const up = s.nodes.filter((n) => n.healthy).length;
  $("stats").replaceChildren(
    stat(`${up}/${s.nodes.length}`, "nodes up"),
    stat(s.requests_in_flight, "requests"),
    stat(s.queued, "queued"),
    stat(s.decode_slots, "decode slots"));
  $("nodes").replaceChildren(...s.nodes.map(nodeCard));
  $("links").replaceChildren(...(s.links.length ? s.links.map((l) => el("div", { class: "link" },
    el("span", { class: "ends" }, el("b", {}, l.prefill), " → ", el("b", {}, l.decode)),
    el("span", { class: "nums" }, `${l.handoffs} hand-offs · ${fmtNum(l.kv_tokens)} KV tokens · ${fmtMB(l.kv_bytes)}`),
    l.bandwidth_gbit_s
      ? el("span", { class: "nums" }, `${fmtRate(l.bandwidth_gbit_s)} Gbit/s · ${l.latency_ms.toFixed(2)} ms (${l.source})`)
      : l.probe_error ? el("span", { class: "nums error-text" }, `probe failed: ${l.probe_error}`) : null))
    : [el("p", { class: "muted" }, "No cache has been shipped yet.")]));
  const rows = s.recent.slice(0, 12).map((r) => el("tr", {},
    el("td", {}, new Date(r.ended_unix_ms).toLocaleTimeString()),
    el("td", {}, r.prefill === r.decode ? r.prefill : `${r.prefill} → ${r.decode}`),
    el("td", { class: "num" }, `${r.prompt_tokens} + ${r.completion_tokens}`),
    el("td", { class: "num" }, fmtMs(r.ttft_ms)),
    el("td", { class: "num wide" }, fmtRate(r.decode_tok_s)),
    el("td", { class: `outcome-${r.outcome}` }, r.outcome + (r.migrations ? ` (moved ${r.migrations}×)` : ""))));
  $("recent").replaceChildren(rows.length
    ? el("table", { class: "requests" },
      el("thead", {}, el("tr", {}, el("th", {}, "ended"), el("th", {}, "nodes"), el("th", { class: "num" }, "tokens"),
        el("th", { class: "num" }, "TTFT"), el("th", { class: "num wide" }, "tok/s"), el("th", {}, "outcome"))),
      el("tbody", {}, rows))
    : el("p", { class: "muted" }, "None yet."));
}

/** Follows /v1/cluster/events, reconnecting after a pause when the stream ends or fails. */
async function connectCluster() {
  state.clusterStream?.abort();
  const controller = new AbortController();
  state.clusterStream = controller;
  try {
    const res = await keyedFetch("/v1/cluster/events", { signal: controller.signal });
    if (!res.ok) throw new Error(`${res.status}`);
    await readEvents(res.body, (name, data) => { if (name === "cluster") renderCluster(JSON.parse(data)); });
  } catch (e) {
    if (controller.signal.aborted) return;
  }
  const chip = $("state-chip");
  chip.dataset.state = "offline";
  chip.textContent = "reconnecting";
  setTimeout(() => { if (state.clusterStream === controller) connectCluster(); }, 2000);
}

/** Narrow screens show one view at a time; #cluster in the address opens that one. */
function setupTabs() {
  const show = (view) => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.view === view));
    document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === view));
  };
  document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => show(tab.dataset.view)));
  if (location.hash === "#cluster") show("cluster");
}

function start() {
  setupKeyDialog();
  setupChat();
  setupTabs();
  connectCluster();
  // ?q=... sends that prompt at once (links that open a chat; the page test uses it), with
  // ?temperature=... and ?max_tokens=... when given.
  const q = new URLSearchParams(location.search);
  // ?model=... picks the model (the picker shows it once the cluster view arrives).
  if (q.get("model")) state.model = q.get("model");
  $("model-pick").addEventListener("change", (e) => { state.model = e.target.value; });
  if (q.get("q")) {
    const params = {};
    for (const k of ["temperature", "max_tokens", "seed"]) if (q.get(k) !== null) params[k] = Number(q.get(k));
    send(q.get("q"), params);
  }
}

start();
