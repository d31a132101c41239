// The playground: streams POST /v1/completions (server-sent events) into the page, each generated
// character coloured by the probability the model gave it (the stream's logprobs), and shows the
// attention of every layer and head from POST /v1/inspect. Its Chat tab talks to a run fine-tuned
// on conversations through POST /v1/chat/completions.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP = 5; // alternatives shown per character
let controller = null; // aborts the running request (Stop)
let blockSize = 0;
let inspected = null; // the last /v1/inspect answer
let focused = -1; // the position whose attention is shown

const show = (s) => s.replace(/\n/g, "\u23ce").replace(/ /g, "\u2423"); // newline, space made visible
const probColour = (p) => `hsl(${Math.round(120 * p)}, 75%, 82%)`;

function tip(target, html) {
  const t = $("tip");
  t.innerHTML = html;
  t.hidden = false;
  const r = target.getBoundingClientRect();
  const left = Math.min(window.scrollX + r.left, window.scrollX + document.documentElement.clientWidth - t.offsetWidth - 4);
  t.style.left = `${Math.max(4, left)}px`;
  t.style.top = `${window.scrollY + r.bottom + 4}px`;
}

function escapeHtml(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// One generated token as a coloured span; its numbers ride along for the tooltip.
function tokenSpan(token, logprob, top) {
  const span = document.createElement("span");
  const p = Math.exp(logprob);
  span.className = "tok";
  span.textContent = token;
  span.dataset.p = p.toFixed(3);
  span.dataset.top = JSON.stringify(Object.entries(top || {}).sort((a, b) => b[1] - a[1]));
  span.style.background = probColour(p);
  return span;
}

function tokenTip(span) {
  const rows = JSON.parse(span.dataset.top)
    .map(([t, lp]) => `<tr><td>${escapeHtml(show(t))}</td><td>${Math.exp(lp).toFixed(3)}</td></tr>`).join("");
  tip(span, `<b>${escapeHtml(show(span.textContent))}</b> p = <span class="p">${span.dataset.p}</span>` +
    `<table><tr><th colspan="2">the model's top ${TOP}</th></tr>${rows}</table>`);
}

// Text arrives in chunks, each with the log-probs of the tokens generated meanwhile; a token's
// text may arrive later than its numbers (stop sequences hold text back). Place each token's span
// once its text is there; text no token explains (a stop sequence cut it) is placed plain.
class Annotator {
  constructor(out) { this.out = out; this.text = ""; this.tokens = []; }
  add(text, logprobs) {
    this.text += text;
    if (logprobs) {
      logprobs.tokens.forEach((t, i) => this.tokens.push([t, logprobs.token_logprobs[i], logprobs.top_logprobs[i]]));
    }
    while (this.text && this.tokens.length) {
      const [t, lp, top] = this.tokens[0];
      if (!t || !this.text.startsWith(t)) {
        if (t.startsWith(this.text)) break; // the rest of this token's text is still to come
        this.flush();
        return;
      }
      this.out.appendChild(tokenSpan(t, lp, top));
      this.text = this.text.slice(t.length);
      this.tokens.shift();
    }
  }
  flush() {
    if (this.text) this.out.appendChild(document.createTextNode(this.text));
    this.text = "";
    this.tokens = [];
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadCard() {
  const health = await (await fetch("health")).json();
  $("key-label").hidden = !health.auth;
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) {
    setStatus(await errorMessage(response), true);
    return;
  }
  const m = (await response.json()).data[0];
  $("card-run").textContent = `${m.id} (${m.checkpoint}, step ${m.step})`;
  $("card-params").textContent = m.parameters.toLocaleString("en-US");
  $("card-loss").textContent =
    m.val_loss == null ? "n/a" : `${m.val_loss.toFixed(3)} (${m.val_bpc.toFixed(3)} bits/char)`;
  $("card-context").textContent = `${m.block_size} tokens, vocabulary ${m.vocab_size}`;
  blockSize = m.block_size;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

// POST `body` to `path` and hand each server-sent event's JSON to `onChunk`, until [DONE].
async function streamJson(path, body, signal, onChunk) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop(); // an event cut in two waits for its rest
    for (const e of events) {
      const data = e.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      onChunk(chunk);
    }
  }
}

async function generate(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  const body = {
    prompt,
    max_tokens: numberOrNull("max_tokens"),
    temperature: numberOrNull("temperature"),
    top_k: numberOrNull("top_k"),
    top_p: numberOrNull("top_p"),
    seed: numberOrNull("seed"),
    stream: true,
    logprobs: TOP,
  };
  const out = $("output");
  out.textContent = prompt;
  const annotate = new Annotator(out);
  $("inspect").disabled = true;
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  const started = performance.now();
  let chars = 0;
  try {
    await streamJson("v1/completions", body, controller.signal, (chunk) => {
      for (const c of chunk.choices) {
        annotate.add(c.text, c.logprobs);
        chars += c.text.length;
      }
    });
    const seconds = (performance.now() - started) / 1000;
    setStatus(`${chars} characters in ${seconds.toFixed(1)} s`);
  } catch (err) {
    if (err.name === "AbortError") setStatus(`stopped after ${chars} characters`);
    else setStatus(err.message, true);
  } finally {
    annotate.flush();
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
    $("inspect").disabled = false;
  }
}

// --- attention ----------------------------------------------------------------------------------

async function inspect() {
  // The last block_size characters of the text: what one forward pass sees (a character is at
  // least one token, so a BPE model gets no more than its block either).
  const text = $("output").textContent.slice(-blockSize);
  $("inspect-status").textContent = "inspecting…";
  const response = await fetch("v1/inspect", { method: "POST", headers: headers(),
    body: JSON.stringify({ text, top: TOP }) });
  if (!response.ok) throw new Error(await errorMessage(response));
  inspected = await response.json();
  for (const [id, n] of [["layer", inspected.n_layer], ["head", inspected.n_head]]) {
    $(id).replaceChildren(...Array.from({ length: n }, (_, i) => new Option(String(i), String(i))));
  }
  const box = $("attention");
  box.replaceChildren(...inspected.tokens.map((t, i) => {
    const span = document.createElement("span");
    span.className = "att";
    span.dataset.i = String(i);
    span.textContent = t.token;
    return span;
  }));
  focused = inspected.tokens.length - 1;
  paintAttention();
}

function paintAttention() {
  if (!inspected || !inspected.attention) return;
  const layer = Number($("layer").value), head = Number($("head").value);
  const row = inspected.attention[layer][head][focused];
  const top = Math.max(...row);
  for (const span of $("attention").children) {
    const j = Number(span.dataset.i);
    const w = j < row.length ? row[j] : 0;
    span.dataset.w = j < row.length ? w.toFixed(4) : "";
    span.style.background = j < row.length ? `rgba(43, 95, 217, ${(0.85 * w / top).toFixed(3)})` : "";
    span.classList.toggle("focus", j === focused);
  }
  $("inspect-status").textContent = `layer ${layer}, head ${head}: what ` +
    `${JSON.stringify(show(inspected.tokens[focused].token))} (position ${focused}) attends to; ` +
    "hover or tap a character";
}

$("inspect").addEventListener("click", () => inspect().catch((err) => {
  $("inspect-status").textContent = err.message;
}));
$("layer").addEventListener("change", paintAttention);
$("head").addEventListener("change", paintAttention);
// A mouse hovers; a finger taps (pointerup: a tap may never turn into a click on a phone).
for (const kind of ["mouseover", "click", "pointerup"]) {
  $("attention").addEventListener(kind, (e) => {
    if (!e.target.classList.contains("att")) return;
    focused = Number(e.target.dataset.i);
    paintAttention();
  });
  $("output").addEventListener(kind, (e) => {
    if (e.target.classList.contains("tok")) tokenTip(e.target);
  });
}
$("output").addEventListener("pointerleave", (e) => { if (e.pointerType === "mouse") $("tip").hidden = true; });

// --- chat: a run fine-tuned on conversations, through POST /v1/chat/completions ----------------

let chatHistory = []; // the conversation so far, without the system message
let chatController = null;

function selectTab(name) {
  for (const tab of ["complete", "chat"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`${tab}-panel`).hidden = tab !== name;
  }
  history.replaceState(null, "", name === "chat" ? "#chat" : location.pathname + location.search);
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("transcript").appendChild(div);
  return div;
}

function setChatStatus(text, isError = false) {
  $("chat-status").textContent = text;
  $("chat-status").classList.toggle("error", isError);
}

async function loadChatTemplate() {
  const response = await fetch("tokenizer_info", { headers: headers() });
  if (!response.ok) return;
  const ready = Boolean((await response.json()).chat_template);
  $("chat-note").hidden = ready;
  $("send").disabled = !ready;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || chatController) return;
  $("chat-input").value = "";
  chatHistory.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  const system = $("chat-system").value.trim();
  const body = {
    messages: (system ? [{ role: "system", content: system }] : []).concat(chatHistory),
    max_tokens: numberOrNull("chat_max_tokens"),
    temperature: numberOrNull("chat_temperature"),
    stream: true,
  };
  chatController = new AbortController();
  $("send").disabled = true;
  $("chat-stop").disabled = false;
  setChatStatus("replying…");
  try {
    await streamJson("v1/chat/completions", body, chatController.signal, (chunk) => {
      for (const c of chunk.choices) out.textContent += c.delta.content || "";
    });
    setChatStatus("");
  } catch (err) {
    if (err.name === "AbortError") setChatStatus("stopped");
    else setChatStatus(err.message, true);
  } finally {
    chatHistory.push({ role: "assistant", content: out.textContent });
    chatController = null;
    $("send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

$("tab-complete").addEventListener("click", () => selectTab("complete"));
$("tab-chat").addEventListener("click", () => selectTab("chat"));
$("chat-form").addEventListener("submit", sendChat);
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) sendChat(e); // Enter sends, Shift+Enter is a new line
});
$("chat-stop").addEventListener("click", () => chatController && chatController.abort());
$("chat-reset").addEventListener("click", () => {
  chatHistory = [];
  $("transcript").replaceChildren();
  setChatStatus("");
});
if (location.hash === "#chat") selectTab("chat");
loadChatTemplate().catch(() => {});

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("api_key").addEventListener("change", () => {
  loadCard().catch((err) => setStatus(err.message, true));
  loadChatTemplate().catch(() => {});
});
loadCard().catch((err) => setStatus(err.message, true));
