// The playground: streams POST /v1/completions (server-sent events) into the page.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null; // aborts the running request (Stop)

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
  const health = await (await fetch("/health")).json();
  $("key-label").hidden = !health.auth;
  const response = await fetch("/v1/models", { headers: headers() });
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
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
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
  };
  const out = $("output");
  out.textContent = prompt;
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  const started = performance.now();
  let chars = 0;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
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
        for (const c of chunk.choices) {
          out.textContent += c.text;
          chars += c.text.length;
        }
      }
    }
    const seconds = (performance.now() - started) / 1000;
    setStatus(`${chars} characters in ${seconds.toFixed(1)} s`);
  } catch (err) {
    if (err.name === "AbortError") setStatus(`stopped after ${chars} characters`);
    else setStatus(err.message, true);
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("api_key").addEventListener("change", () => loadCard().catch((err) => setStatus(err.message, true)));
loadCard().catch((err) => setStatus(err.message, true));
