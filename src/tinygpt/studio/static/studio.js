// The studio page: a client of the JSON API under /api (see /openapi.json). Its state lives in the
// URL's hash (view, text, run, compared runs, step), so a link reopens the same view. The launch
// token travels as a cookie set by the tokenized URL; nothing here stores it.

const $ = (id) => document.getElementById(id);
const COLOURS = ["#2457c5", "#c5245f", "#1b8a4b", "#b86e00", "#7a3dc2", "#00838f"];
const state = { view: "text", text: null, run: null, compare: [], step: null };
let runs = []; // GET /api/runs
let texts = {}; // id -> figures
let metrics = {}; // run id -> loss reports (from the event stream or GET /api/runs/{id})
let source = null; // the EventSource following the open run
let fields = []; // GET /api/settings
let presetEstimates = {};

// --- the URL -----------------------------------------------------------------------------------

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  state.view = ["text", "model", "train", "compare"].includes(p.get("view")) ? p.get("view") : "text";
  state.text = p.get("text") || null;
  state.run = p.get("run") || null;
  state.compare = (p.get("runs") || "").split(",").filter(Boolean);
  state.step = p.get("step") === null ? null : Number(p.get("step"));
}

function writeHash() {
  const p = new URLSearchParams();
  p.set("view", state.view);
  if (state.text) p.set("text", state.text);
  if (state.run) p.set("run", state.run);
  if (state.compare.length) p.set("runs", state.compare.join(","));
  if (state.step !== null && !Number.isNaN(state.step)) p.set("step", String(state.step));
  history.replaceState(null, "", "#" + p.toString());
}

// --- talking to the API ------------------------------------------------------------------------

async function api(path, options = {}) {
  const init = { ...options, headers: { ...(options.headers || {}) } };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const e = new Error(body && body.error ? body.error.message : `HTTP ${response.status}`);
    e.status = response.status;
    e.param = body && body.error ? body.error.param : null;
    throw e;
  }
  return body;
}

function showError(id, e) {
  const el = $(id);
  el.textContent = e ? e.message : "";
  el.hidden = !e;
}

function setStatus(text) {
  $("status").textContent = text;
}

// --- views -------------------------------------------------------------------------------------

function show(view) {
  state.view = view;
  for (const b of document.querySelectorAll(".steps button")) {
    if (b.dataset.view === view) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  for (const v of ["text", "model", "train", "compare"]) $("view-" + v).hidden = v !== view;
  writeHash();
  if (view === "model") renderModel();
  if (view === "train") openRun(state.run);
  if (view === "compare") renderCompare();
}

// --- 1. text -----------------------------------------------------------------------------------

const fmt = (n) => n.toLocaleString("en-US");
const showChar = (c) => JSON.stringify(c).slice(1, -1) || c;

function renderText(t) {
  texts[t.id] = t;
  state.text = t.id;
  writeHash();
  $("text-figures").hidden = false;
  $("text-title").textContent = t.name;
  $("f-chars").textContent = fmt(t.chars);
  $("f-vocab").textContent = `${t.vocab_size} characters`;
  $("f-split").textContent = `${fmt(t.train_chars)} / ${fmt(t.val_chars)}`;
  $("f-uniform").textContent = `${t.uniform_loss.toFixed(3)} nats`;
  $("f-bigram").textContent = t.bigram_loss === null ? "n/a" : `${t.bigram_loss.toFixed(3)} nats`;
  $("f-rare").textContent = t.rare_count
    ? `Rare characters (${t.rare_count}, seen 3 times or less): ` + t.rare.map((r) => `"${showChar(r.char)}" ×${r.count}`).join(", ")
    : "No rare characters.";
  $("f-odd").textContent = t.odd_count
    ? `Odd characters (${t.odd_count}): ` + t.odd.map((r) => `${r.name} ×${r.count}`).join(", ")
    : "No control or invisible characters.";
  $("f-valonly").textContent = t.val_only.length
    ? `Only in val, never in train (the model cannot learn them): ${t.val_only.map((c) => `"${showChar(c)}"`).join(", ")}`
    : "";
  $("f-preview").textContent = t.preview;
  const option = [...$("kept-texts").options].find((o) => o.value === t.id);
  if (!option) $("kept-texts").add(new Option(`${t.name} (${fmt(t.chars)} chars)`, t.id));
  $("kept-texts").value = t.id;
  presetEstimates = {};
}

async function sendText(request) {
  showError("text-error", null);
  setStatus("reading the text…");
  try {
    renderText(await api("/api/texts", request));
    setStatus("");
  } catch (e) {
    showError("text-error", e);
    setStatus("");
  }
}

async function loadTexts() {
  const found = (await api("/api/texts")).data;
  for (const t of found) {
    texts[t.id] = t;
    $("kept-texts").add(new Option(`${t.name} (${fmt(t.chars)} chars)`, t.id));
  }
  if (state.text && texts[state.text]) renderText(texts[state.text]);
}

// --- 2. model ----------------------------------------------------------------------------------

let presets = [];

function chosenPreset() {
  const c = document.querySelector("input[name=preset]:checked");
  return c ? c.value : null;
}

function advancedSettings() {
  const out = {};
  for (const f of fields) {
    const el = $("set-" + f.name);
    if (!el) continue;
    if (f.type === "bool") {
      if (el.value !== "") out[f.name] = el.value === "true";
      continue;
    }
    const v = el.value.trim();
    if (v === "") continue;
    out[f.name] = f.type === "int" ? (/^-?\d+$/.test(v) ? Number(v) : v) : f.type === "float" ? (Number.isFinite(Number(v)) ? Number(v) : v) : v;
  }
  return out;
}

function renderSettings() {
  const box = $("settings");
  box.replaceChildren();
  for (const f of fields) {
    const wrap = document.createElement("div");
    const label = document.createElement("label");
    label.textContent = f.name;
    label.title = f.help;
    label.htmlFor = "set-" + f.name;
    let input;
    if (f.choices || f.type === "bool") {
      input = document.createElement("select");
      input.add(new Option(`(${f.default === null ? "none" : f.default})`, ""));
      for (const c of f.choices || ["true", "false"]) input.add(new Option(String(c), String(c)));
    } else {
      input = document.createElement("input");
      input.type = "text";
      input.inputMode = f.type === "str" ? "text" : "decimal";
      input.placeholder = f.default === null ? "" : String(f.default);
    }
    input.id = "set-" + f.name;
    input.addEventListener("change", estimateChosen);
    const error = document.createElement("p");
    error.className = "error";
    error.id = "err-" + f.name;
    error.hidden = true;
    wrap.append(label, input, error);
    box.append(wrap);
  }
}

function describeSeconds(s) {
  if (s === null || s === undefined) return "?";
  if (s < 90) return `~${Math.max(1, Math.round(s))} s`;
  if (s < 5400) return `~${Math.round(s / 60)} min`;
  return `~${(s / 3600).toFixed(1)} h`;
}

async function renderModel() {
  const t = texts[state.text];
  $("model-text").textContent = t ? `Text: ${t.name}, ${fmt(t.chars)} characters, vocabulary ${t.vocab_size}.`
    : "Choose a text first (step 1).";
  $("start").disabled = !t;
  if (!presets.length) {
    presets = (await api("/api/presets")).data;
    const box = $("presets");
    for (const p of presets) {
      const label = document.createElement("label");
      label.className = "preset";
      const radio = document.createElement("input");
      radio.type = "radio";
      radio.name = "preset";
      radio.value = p.name;
      radio.checked = p.name === "cpu-quick";
      radio.addEventListener("change", estimateChosen);
      const title = document.createElement("strong");
      title.textContent = " " + p.name;
      const est = document.createElement("span");
      est.className = "est";
      est.id = "est-" + p.name;
      const d = document.createElement("p");
      d.textContent = p.description;
      label.append(radio, title, document.createElement("br"), est, d);
      box.append(label);
    }
  }
  if (t) estimateAll();
}

async function estimateAll() {
  for (const p of presets) {
    const key = state.text + ":" + p.name;
    const el = $("est-" + p.name);
    if (presetEstimates[key]) {
      el.textContent = presetEstimates[key];
      continue;
    }
    el.textContent = "timing…";
    try {
      const e = await api("/api/estimate", { json: { text: state.text, preset: p.name, settings: {} } });
      presetEstimates[key] = e.parameters === null ? `your time (${describeSeconds(e.seconds)})`
        : `${describeSeconds(e.seconds)} here · ${fmt(e.parameters)} parameters`;
    } catch (err) {
      presetEstimates[key] = err.message;
    }
    el.textContent = presetEstimates[key];
  }
  estimateChosen();
}

let estimating = 0; // only the latest estimate's answer is shown

async function estimateChosen() {
  const mine = ++estimating;
  if (!state.text) return;
  try {
    const e = await api("/api/estimate", { json: { text: state.text, preset: chosenPreset(), settings: advancedSettings() } });
    if (mine !== estimating) return;
    clearErrors();
    $("estimate").textContent = e.parameters === null ? `auto: a model sized in the job for ${describeSeconds(e.seconds)}`
      : `${fmt(e.parameters)} parameters, ${fmt(e.steps)} steps: ${describeSeconds(e.seconds)} on this machine` +
        (e.bounded_by === "time" ? " (its time limit)" : "") + (e.training_now ? ` (timed while ${e.training_now} trains)` : "");
    return true;
  } catch (err) {
    if (mine !== estimating) return;
    clearErrors();
    fieldError(err, "start-error");
    $("estimate").textContent = "";
    return false;
  }
}

function clearErrors() {
  for (const el of document.querySelectorAll("#settings .error")) el.hidden = true;
  showError("start-error", null);
}

function fieldError(err, fallback) {
  const name = err.param && err.param.startsWith("settings.") ? err.param.slice(9) : null;
  const el = name && $("err-" + name);
  if (el) {
    el.textContent = err.message;
    el.hidden = false;
    $("advanced").open = true;
  } else {
    showError(fallback, err);
  }
}

async function start() {
  clearErrors();
  const body = { text: state.text, preset: chosenPreset(), settings: advancedSettings() };
  const name = $("run-name").value.trim();
  if (name) body.name = name;
  $("start").disabled = true;
  try {
    const run = await api("/api/runs", { json: body });
    state.run = run.id;
    state.step = null;
    await refreshRuns();
    show("train");
  } catch (err) {
    fieldError(err, "start-error");
  } finally {
    $("start").disabled = false;
  }
}

// --- runs list ---------------------------------------------------------------------------------

async function refreshRuns() {
  const answer = await api("/api/runs");
  runs = answer.data;
  const list = $("runs");
  list.replaceChildren();
  for (const r of runs) {
    const li = document.createElement("li");
    if (r.id === state.run) li.className = "selected";
    const tick = document.createElement("input");
    tick.type = "checkbox";
    tick.checked = state.compare.includes(r.id);
    tick.setAttribute("aria-label", "compare " + r.id);
    tick.addEventListener("change", () => {
      state.compare = tick.checked ? [...state.compare, r.id] : state.compare.filter((x) => x !== r.id);
      writeHash();
      if (state.view === "compare") renderCompare();
    });
    const name = document.createElement("button");
    name.type = "button";
    name.className = "run-name";
    name.textContent = r.id;
    name.addEventListener("click", () => {
      state.run = r.id;
      state.step = null;
      show(state.view === "compare" ? "compare" : "train");
      refreshRuns();
    });
    const badge = document.createElement("span");
    badge.className = "badge " + r.state;
    badge.textContent = r.best_val_loss == null ? r.state : `${r.state} · ${r.best_val_loss.toFixed(3)}`;
    li.append(tick, name, badge);
    list.append(li);
  }
  const training = runs.find((r) => ["starting", "running", "stopping"].includes(r.state));
  setStatus(training ? `training ${training.id}` + (training.eta_seconds != null ? `, ${describeSeconds(training.eta_seconds)} left` : "") : "");
  return runs;
}

// --- 3. train: one run, followed live --------------------------------------------------------

function runOf(id) {
  return runs.find((r) => r.id === id);
}

async function openRun(id) {
  if (source) {
    source.close();
    source = null;
  }
  if (!id) {
    $("run-title").textContent = "— start or pick a run";
    return;
  }
  let run;
  try {
    run = await api(`/api/runs/${encodeURIComponent(id)}`);
  } catch (e) {
    showError("train-error", e);
    return;
  }
  metrics[id] = run.metrics || [];
  renderRun(run);
  follow(id);
}

function follow(id) {
  const last = (metrics[id] || []).at(-1);
  const url = `/api/runs/${encodeURIComponent(id)}/events` + (last ? `?after=${last.step}` : "");
  source = new EventSource(url);
  source.addEventListener("metrics", (e) => {
    const row = JSON.parse(e.data);
    const rows = metrics[id] || (metrics[id] = []);
    if (!rows.length || row.step > rows.at(-1).step) rows.push(row);
    if (state.run === id) renderCurves();
  });
  source.addEventListener("state", (e) => {
    const view = JSON.parse(e.data);
    delete view.metrics;
    if (state.run === id) renderRun(view, false);
    refreshRuns();
  });
  source.addEventListener("end", () => {
    source.close();
    source = null;
    refreshRuns();
  });
}

let shownRun = null;

function renderRun(run, withCurves = true) {
  shownRun = run;
  $("run-title").textContent = run.id;
  const facts = [`${run.state}`];
  if (run.shape) facts.push(`${run.shape}, ${fmt(run.parameters)} parameters`);
  if (run.max_iters != null) facts.push(`step ${fmt(run.step)} of ${fmt(run.max_iters)}`);
  if (run.eta_seconds != null) facts.push(`${describeSeconds(run.eta_seconds)} left`);
  if (run.best_step != null) facts.push(`best val ${run.best_val_loss.toFixed(4)} at step ${run.best_step}`);
  if (run.final_val_loss != null) facts.push(`whole val ${run.final_val_loss.toFixed(4)}`);
  $("run-facts").textContent = facts.join(" · ");
  const active = ["starting", "running", "stopping"].includes(run.state);
  $("stop").disabled = run.state !== "running" && run.state !== "starting";
  $("resume").disabled = active || run.state !== "stopped";
  $("extend").disabled = active || !run.settings;
  showError("train-error", run.state === "failed" || run.state === "damaged" ? new Error(run.message || run.state) : null);
  if (withCurves) renderCurves();
}

function renderCurves() {
  const id = state.run;
  const rows = metrics[id] || [];
  const run = shownRun && shownRun.id === id ? shownRun : runOf(id);
  const text = run && run.text ? texts[run.text] : null;
  const refs = text && run.vocab_size === text.vocab_size ? text : null; // the references are per character
  drawChart($("chart"), [{ id, rows, colour: COLOURS[0], best: run ? run.best_step : null }], refs, state.step);
  const legend = [["train", COLOURS[0], true], ["val", COLOURS[0], false]];
  if (refs) legend.push(["ln(V): uniform", "#999", true], ["count-based bigram", "#999", false]);
  $("legend").replaceChildren(...legend.map(([name, c, dashed]) => legendItem(name, c, dashed)));
  const slider = $("step-slider");
  const sampled = rows.filter((r) => typeof r.sample === "string");
  slider.max = String(Math.max(0, sampled.length - 1));
  let index = sampled.length - 1;
  if (state.step !== null) {
    const at = sampled.findLastIndex((r) => r.step <= state.step);
    index = at >= 0 ? at : 0;
  }
  slider.value = String(Math.max(0, index));
  const chosen = sampled[index];
  $("step-shown").textContent = chosen ? String(chosen.step) : "–";
  $("sample").textContent = chosen ? chosen.sample : "(no sample yet: one is written at each loss report)";
}

function legendItem(name, colour, dashed) {
  const s = document.createElement("span");
  s.textContent = name;
  s.style.setProperty("--c", colour);
  if (dashed) s.className = "dashed";
  return s;
}

// --- the chart: SVG, no library ---------------------------------------------------------------

const SVGNS = "http://www.w3.org/2000/svg";

function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (parent) parent.append(e);
  return e;
}

function drawChart(svg, series, refs, markStep) {
  svg.replaceChildren();
  const bpc = $("bpc").checked;
  const key = (r, split) => (bpc ? r[split + "_bpc"] : r[split + "_loss"]);
  const W = 640, H = 320, L = 52, R = 12, T = 12, B = 34;
  const points = series.flatMap((s) => s.rows.flatMap((r) => [key(r, "train"), key(r, "val")])).filter((v) => Number.isFinite(v));
  const steps = series.flatMap((s) => s.rows.map((r) => r.step));
  const toBits = bpc ? 1 / Math.LN2 : 1;
  const refValues = refs ? [refs.uniform_loss * toBits, refs.bigram_loss === null ? null : refs.bigram_loss * toBits].filter((v) => v !== null) : [];
  if (!points.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#888" }, svg).textContent = "no loss report yet";
    return;
  }
  let lo = Math.min(...points), hi = Math.max(...points, ...refValues.filter((v) => v < Math.max(...points) * 1.6));
  if (hi - lo < 1e-6) hi = lo + 0.1;
  const pad = (hi - lo) * 0.06;
  lo -= pad;
  hi += pad;
  const maxStep = Math.max(1, ...steps);
  const x = (s) => L + (s / maxStep) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#eee" }, svg);
    el("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#666" }, svg).textContent = v.toFixed(2);
  }
  for (let i = 0; i <= 4; i++) {
    const s = Math.round((maxStep * i) / 4);
    el("text", { x: x(s), y: H - 12, "text-anchor": "middle", "font-size": 11, fill: "#666" }, svg).textContent = String(s);
  }
  el("text", { x: W - R, y: H - 1, "text-anchor": "end", "font-size": 11, fill: "#666" }, svg).textContent =
    bpc ? "step · bits per character" : "step · loss (nats per token)";
  refValues.forEach((v, i) => {
    if (v > hi || v < lo) return;
    el("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#999", "stroke-dasharray": i === 0 ? "5 4" : "none" }, svg);
    el("text", { x: W - R - 4, y: y(v) - 4, "text-anchor": "end", "font-size": 11, fill: "#777" }, svg).textContent =
      i === 0 ? "uniform" : "bigram";
  });
  for (const s of series) {
    for (const split of ["train", "val"]) {
      const pts = s.rows.filter((r) => Number.isFinite(key(r, split))).map((r) => `${x(r.step).toFixed(1)},${y(key(r, split)).toFixed(1)}`);
      if (!pts.length) continue;
      el("polyline", { points: pts.join(" "), fill: "none", stroke: s.colour, "stroke-width": 2,
        "stroke-dasharray": split === "train" ? "6 4" : "none" }, svg);
      if (pts.length === 1) {
        const [px, py] = pts[0].split(",");
        el("circle", { cx: px, cy: py, r: 3, fill: s.colour }, svg);
      }
    }
    const best = s.rows.find((r) => r.step === s.best);
    if (best && Number.isFinite(key(best, "val"))) {
      const dot = el("circle", { cx: x(best.step), cy: y(key(best, "val")), r: 5, fill: "#fff", stroke: s.colour, "stroke-width": 2 }, svg);
      el("title", {}, dot).textContent = `best checkpoint: step ${best.step}`;
    }
  }
  if (markStep !== null && markStep !== undefined && series.length === 1) {
    el("line", { x1: x(markStep), x2: x(markStep), y1: T, y2: H - B, stroke: "#b86e00", "stroke-width": 1.5 }, svg);
  }
}

// --- 4. compare and inspect -------------------------------------------------------------------

async function renderCompare() {
  const ids = state.compare.length ? state.compare : state.run ? [state.run] : [];
  for (const id of ids) {
    if (!metrics[id]) {
      try {
        metrics[id] = (await api(`/api/runs/${encodeURIComponent(id)}`)).metrics || [];
      } catch {
        metrics[id] = [];
      }
    }
  }
  const series = ids.map((id, i) => ({ id, rows: metrics[id], colour: COLOURS[i % COLOURS.length], best: (runOf(id) || {}).best_step }));
  drawChart($("compare-chart"), series, null, null);
  $("compare-legend").replaceChildren(...series.map((s) => legendItem(s.id + " (val; train dashed)", s.colour, false)));
  // the settings that differ between the compared runs, and nothing else
  const table = $("differ");
  const chosen = ids.map(runOf).filter((r) => r && r.settings);
  const keys = [...new Set(chosen.flatMap((r) => Object.keys(r.settings)))].sort();
  const differ = keys.filter((k) => new Set(chosen.map((r) => JSON.stringify(r.settings[k]))).size > 1);
  const head = document.createElement("tr");
  head.append(...["setting", ...chosen.map((r) => r.id)].map((t) => Object.assign(document.createElement("th"), { textContent: t })));
  table.tHead.replaceChildren(head);
  const body = differ.map((k) => {
    const tr = document.createElement("tr");
    tr.append(...[k, ...chosen.map((r) => JSON.stringify(r.settings[k]))].map((t) => Object.assign(document.createElement("td"), { textContent: t })));
    return tr;
  });
  if (chosen.length < 2) {
    const tr = document.createElement("tr");
    tr.append(Object.assign(document.createElement("td"), { textContent: "tick two runs or more in the list to compare them", colSpan: 2 }));
    body.push(tr);
  } else if (!differ.length) {
    const tr = document.createElement("tr");
    tr.append(Object.assign(document.createElement("td"), { textContent: "the runs' settings are the same", colSpan: chosen.length + 1 }));
    body.push(tr);
  }
  table.tBodies[0].replaceChildren(...body);
  const run = state.run;
  $("inspect-title").textContent = run || "a run (pick one in the list)";
  $("open-playground").disabled = !run;
  for (const [id, path] of [["export-zip", "export.zip"], ["export-csv", "metrics.csv"], ["export-hf", "hf.zip"]]) {
    $(id).href = run ? `/api/runs/${encodeURIComponent(run)}/${path}` : "#";
  }
}

function openPlayground() {
  if (!state.run) return;
  const frame = $("playground");
  frame.src = `/api/runs/${encodeURIComponent(state.run)}/serve/`;
  frame.hidden = false;
}

// --- wiring --------------------------------------------------------------------------------------

async function post(path) {
  showError("train-error", null);
  try {
    const view = await api(path, { json: {} });
    renderRun(view, false);
    await refreshRuns();
    return view;
  } catch (e) {
    showError("train-error", e);
    return null;
  }
}

function wire() {
  for (const b of document.querySelectorAll(".steps button")) b.addEventListener("click", () => show(b.dataset.view));
  for (const b of document.querySelectorAll("[data-go]")) b.addEventListener("click", () => show(b.dataset.go));
  $("use-shakespeare").addEventListener("click", () => sendText({ json: { builtin: "tinyshakespeare" } }));
  $("use-paste").addEventListener("click", () => {
    const name = $("paste-name").value.trim();
    sendText({ json: { text: $("paste").value, ...(name ? { name } : {}) } });
  });
  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (!file) return;
    const form = new FormData();
    form.append("file", file);
    sendText({ method: "POST", body: form });
  });
  $("kept-texts").addEventListener("change", () => {
    const t = texts[$("kept-texts").value];
    if (t) renderText(t);
  });
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", () => post(`/api/runs/${encodeURIComponent(state.run)}/stop`));
  $("resume").addEventListener("click", async () => {
    if (await post(`/api/runs/${encodeURIComponent(state.run)}/resume`)) openRun(state.run);
  });
  $("extend").addEventListener("click", async () => {
    const body = {};
    if ($("extend-steps").value.trim()) body.steps = Number($("extend-steps").value);
    if ($("extend-minutes").value.trim()) body.seconds = 60 * Number($("extend-minutes").value);
    showError("train-error", null);
    try {
      await api(`/api/runs/${encodeURIComponent(state.run)}/resume`, { json: body });
      await refreshRuns();
      openRun(state.run);
    } catch (e) {
      showError("train-error", e);
    }
  });
  $("bpc").addEventListener("change", () => (state.view === "compare" ? renderCompare() : renderCurves()));
  $("step-slider").addEventListener("input", () => {
    const sampled = (metrics[state.run] || []).filter((r) => typeof r.sample === "string");
    const row = sampled[Number($("step-slider").value)];
    state.step = row ? row.step : null;
    writeHash();
    renderCurves();
  });
  $("open-playground").addEventListener("click", openPlayground);
  window.addEventListener("hashchange", () => { // a link to another view of the page, followed
    readHash();
    refreshRuns().catch(() => {});
    show(state.view);
  });
}

async function main() {
  readHash();
  wire();
  try {
    fields = (await api("/api/settings")).data;
  } catch (e) {
    setStatus(e.status === 401 ? "Open the URL that tinygpt studio printed (it carries the token)." : e.message);
    return;
  }
  renderSettings();
  await Promise.all([loadTexts(), refreshRuns()]);
  show(state.view);
  setInterval(() => refreshRuns().catch(() => {}), 5000);
}

main();
