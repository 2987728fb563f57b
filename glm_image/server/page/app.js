// The glm-image page: it talks to this server's public API only (the same endpoints as any
// client) and shows the API's answers and error messages as they are. No build step, no
// dependencies, nothing fetched from elsewhere. Paths are relative, so the page also works
// behind a proxy that serves it under a prefix.
"use strict";

const KEY_STORE = "glm-image-api-key";
const POLL_MS = 250;
const $ = (id) => document.getElementById(id);

let config = null;
let running = null; // {controller, tag, timer, started}
let current = null; // the result shown: {url, seed}

function withKey(headers) {
  const all = Object.assign({}, headers || {});
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) all.Authorization = "Bearer " + key;
  return all;
}

function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = withKey(opts.headers);
  return fetch(path, opts);
}

// The API's own message ({"error": {"message": ...}}), else the HTTP status.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") return body.error.message;
  } catch (e) {
    // not JSON: fall through to the status line
  }
  return `HTTP ${response.status} ${response.statusText}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes); // works without a secure context, unlike randomUUID
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---- the API key -------------------------------------------------------------------------

function showKeyPanel(open, message) {
  $("key-panel").hidden = !open;
  $("key-toggle").setAttribute("aria-expanded", String(open));
  if (message) $("key-message").textContent = message;
  if (open) $("api-key").focus();
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  start();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  showKeyPanel(true, "Key forgotten.");
}

// ---- the form ----------------------------------------------------------------------------

function countPrompt() {
  const max = config ? config.prompt_max_chars : 1000;
  const count = Array.from($("prompt").value).length; // code points, as the server counts
  const out = $("prompt-count");
  out.textContent = `${count} / ${max} characters`;
  out.classList.toggle("over", count > max);
}

function sizeProblem(name, text) {
  const s = config.sizes;
  const value = Number(text);
  if (!/^[0-9]+$/.test(text) || value < s.minimum || value > s.maximum || value % s.multiple) {
    return `${name} = ${text || "(empty)"} is not allowed; allowed: ${s.minimum}..${s.maximum} in multiples of ${s.multiple}`;
  }
  return "";
}

function checkSize() {
  if (!config) return;
  const custom = $("size-preset").value === "custom";
  $("custom-size").hidden = !custom;
  const hint = $("size-hint");
  const s = config.sizes;
  const rule = `Sides ${s.minimum}..${s.maximum} pixels in multiples of ${s.multiple}.`;
  if (!custom) {
    hint.textContent = rule;
    return;
  }
  const problems = [];
  for (const name of ["width", "height"]) {
    const problem = sizeProblem(name, $(name).value.trim());
    $(name).setAttribute("aria-invalid", String(Boolean(problem)));
    if (problem) problems.push(problem);
  }
  // A hint only: the request is still sent, and the server's answer is what the page shows.
  hint.textContent = problems.length ? problems.join("; ") : rule;
}

function sizeValue() {
  const preset = $("size-preset").value;
  if (preset !== "custom") return preset;
  return `${$("width").value.trim()}x${$("height").value.trim()}`;
}

function applyConfig() {
  $("model").textContent = `model: ${config.model}`;
  $("prompt-count").textContent = `0 / ${config.prompt_max_chars} characters`;
  const select = $("size-preset");
  select.textContent = "";
  const s = config.sizes;
  let chosen = "custom";
  for (const size of s.recommended) {
    const [w, h] = size.split("x").map(Number);
    const fits = [w, h].every((v) => v >= s.minimum && v <= s.maximum && v % s.multiple === 0);
    const option = new Option(fits ? size : `${size} (not allowed by this model)`, size);
    option.disabled = !fits;
    select.add(option);
    if (fits && chosen === "custom") chosen = size;
  }
  select.add(new Option("custom width x height", "custom"));
  select.value = chosen;
  const side = Math.min(s.maximum, Math.max(s.minimum, 512));
  $("width").value = $("height").value = String(side - (side % s.multiple));
  $("steps").value = String(config.steps.default);
  $("steps-hint").textContent = `1..${config.steps.maximum}`;
  $("guidance").value = String(config.guidance.default);
  $("guidance-hint").textContent = `${config.guidance.minimum}..${config.guidance.maximum} (1: none)`;
  const engine = config.engine;
  const cache = engine.dit_cache ? Object.entries(engine.dit_cache).map(([k, v]) => `${k} ${v}`).join(", ") : "none";
  const decoding = engine.ar_decoding === "jacobi" ? `jacobi (window ${engine.jacobi_window})` : engine.ar_decoding;
  fillPairs($("engine-options"), { "AR decoding": decoding, "DiT step cache": cache, quantize: engine.quantize });
  countPrompt();
  checkSize();
}

function fillPairs(list, pairs) {
  list.textContent = "";
  for (const [key, value] of Object.entries(pairs)) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
}

// A number field as the API should see it: a number when it reads as one, else the text as
// typed, so the server's 400 names the field and its value.
function numberField(id, integer) {
  const text = $(id).value.trim();
  const pattern = integer ? /^-?[0-9]+$/ : /^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$/;
  return pattern.test(text) ? Number(text) : text;
}

function showCondition() {
  const file = $("condition").files[0];
  const image = $("condition-image");
  if (image.src) URL.revokeObjectURL(image.src);
  image.removeAttribute("src");
  $("condition-preview").hidden = !file;
  if (file) image.src = URL.createObjectURL(file);
}

function clearCondition() {
  $("condition").value = "";
  showCondition();
  $("condition").focus();
}

// ---- generation, progress, cancel --------------------------------------------------------

function resetProgress() {
  for (const stage of ["ar", "dit"]) {
    $(`${stage}-progress`).max = 1;
    $(`${stage}-progress`).value = 0;
    $(`${stage}-text`).textContent = "-";
  }
}

function showProgress(answer) {
  if (answer.state === "queued") {
    setStatus(`Queued: ${answer.ahead} request(s) ahead.`);
  } else if (answer.state === "running") {
    setStatus("Running.");
  } else if (answer.state === "finishing") {
    setStatus("Writing the image.");
  }
  for (const [stage, { done, total }] of Object.entries(answer.stages || {})) {
    const bar = $(`${stage}-progress`);
    if (!bar) continue;
    bar.max = total;
    bar.value = done;
    $(`${stage}-text`).textContent = `${done} / ${total}`;
  }
}

function finishProgress() {
  for (const stage of ["ar", "dit"]) {
    const bar = $(`${stage}-progress`);
    if ($(`${stage}-text`).textContent === "-") continue;
    bar.value = bar.max;
    $(`${stage}-text`).textContent = `${bar.max} / ${bar.max}`;
  }
}

async function poll() {
  const job = running;
  if (!job) return;
  try {
    const response = await api(`v1/progress/${job.tag}`, { cache: "no-store" });
    if (response.ok && running === job) showProgress(await response.json());
  } catch (e) {
    // a missed poll is not an error; the next one comes
  }
  if (running === job) job.timer = setTimeout(poll, POLL_MS);
}

function request() {
  const fields = {
    prompt: $("prompt").value,
    size: sizeValue(),
    steps: numberField("steps", true),
    guidance: numberField("guidance", false),
  };
  if ($("seed-fixed").checked) fields.seed = numberField("seed", true);
  const file = $("condition").files[0];
  if (!file) {
    const body = Object.assign({ n: 1, response_format: "url" }, fields);
    return { path: "v1/images/generations", body: JSON.stringify(body), type: "application/json" };
  }
  const form = new FormData();
  form.append("image", file);
  for (const [key, value] of Object.entries(fields)) form.append(key, String(value));
  form.append("response_format", "url");
  return { path: "v1/images/edits", body: form, type: null };
}

function setRunning(on) {
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  $("generate-form").setAttribute("aria-busy", String(on));
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  resetProgress();
  const { path, body, type } = request();
  const job = { controller: new AbortController(), tag: randomId(), timer: null, started: performance.now() };
  running = job;
  setRunning(true);
  setStatus("Sending.");
  job.timer = setTimeout(poll, POLL_MS);
  const headers = { "X-Progress-Id": job.tag };
  if (type) headers["Content-Type"] = type;
  try {
    const response = await api(path, { method: "POST", body, headers, signal: job.controller.signal });
    if (!response.ok) {
      showError(await errorMessage(response));
      setStatus(`The server refused the request (HTTP ${response.status}).`);
      if (response.status === 401) showKeyPanel(true);
      return;
    }
    const answer = await response.json();
    const item = answer.data[0];
    finishProgress(); // the last poll may predate the last steps; every step ran
    const seconds = ((performance.now() - job.started) / 1000).toFixed(1);
    await showResult(item.url);
    setStatus(`Done in ${seconds} s (seed ${item.seed}).`);
    loadGallery();
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("Cancelled: the server stops the request's work at its next step.");
    } else {
      showError(`The server could not be reached: ${e.message}`);
      setStatus("");
    }
  } finally {
    clearTimeout(job.timer);
    running = null;
    setRunning(false);
  }
}

function cancel() {
  if (running) running.controller.abort(); // the server sees the connection close
}

// ---- results -----------------------------------------------------------------------------

// The text chunks of a PNG (tEXt, and iTXt stored uncompressed: what the server writes).
function pngText(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const latin = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const text = {};
  let at = 8; // after the signature
  while (at + 8 <= bytes.length) {
    const length = view.getUint32(at);
    const type = latin.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    if (type === "tEXt") {
      const nul = data.indexOf(0);
      text[latin.decode(data.subarray(0, nul))] = latin.decode(data.subarray(nul + 1));
    } else if (type === "iTXt") {
      const nul = data.indexOf(0);
      const key = latin.decode(data.subarray(0, nul));
      const compressed = data[nul + 1] === 1;
      const lang = data.indexOf(0, nul + 3);
      const translated = data.indexOf(0, lang + 1);
      text[key] = compressed ? "(compressed)" : utf8.decode(data.subarray(translated + 1));
    } else if (type === "IEND") {
      break;
    }
    at += 12 + length;
  }
  return text;
}

async function showResult(url) {
  const response = await fetch(url, { cache: "force-cache" });
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  const params = pngText(await response.arrayBuffer());
  const seed = params.seed || "";
  current = { url, seed };
  const image = $("result-image");
  image.src = url;
  image.alt = params.prompt ? `generated image: ${params.prompt}` : "generated image";
  const link = $("download");
  link.href = url;
  link.download = `glm-image-${seed || "image"}.png`;
  $("result-figure").hidden = false;
  $("result-empty").hidden = true;
  fillPairs($("result-params"), params);
}

async function useAsCondition() {
  if (!current) return;
  const response = await fetch(current.url, { cache: "force-cache" });
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  const blob = await response.blob();
  const file = new File([blob], current.url.split("/").pop(), { type: "image/png" });
  const files = new DataTransfer();
  files.items.add(file);
  $("condition").files = files.files;
  showCondition();
  setStatus("The result is the condition image of the next request.");
}

async function loadGallery() {
  let response;
  try {
    response = await api("v1/files?limit=24", { cache: "no-store" });
  } catch (e) {
    return;
  }
  if (!response.ok) {
    if (response.status === 401) showKeyPanel(true, await errorMessage(response));
    return;
  }
  const { data } = await response.json();
  const list = $("gallery");
  list.textContent = "";
  $("gallery-empty").hidden = data.length > 0;
  for (const item of data) {
    const when = new Date(item.created * 1000).toLocaleString();
    const button = document.createElement("button");
    button.type = "button";
    button.title = `${item.name}, ${when}`;
    const image = document.createElement("img");
    image.src = item.url;
    image.alt = `result of ${when}: show it`;
    image.loading = "lazy";
    button.append(image);
    button.addEventListener("click", () => {
      showError("");
      showResult(item.url);
    });
    const entry = document.createElement("li");
    entry.append(button);
    list.append(entry);
  }
}

// ---- start -------------------------------------------------------------------------------

async function start() {
  let response;
  try {
    response = await api("v1/web/config", { cache: "no-store" });
  } catch (e) {
    showError(`The server could not be reached: ${e.message}`);
    return;
  }
  if (response.status === 401) {
    showKeyPanel(true, `${await errorMessage(response)}. Enter the server's API key.`);
    $("generate").disabled = true;
    return;
  }
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  config = await response.json();
  showKeyPanel(false);
  showError("");
  $("generate").disabled = false;
  applyConfig();
  loadGallery();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-toggle").addEventListener("click", () => showKeyPanel($("key-panel").hidden));
  $("key-form").addEventListener("submit", saveKey);
  $("key-forget").addEventListener("click", forgetKey);
  $("prompt").addEventListener("input", countPrompt);
  $("size-preset").addEventListener("change", checkSize);
  $("width").addEventListener("input", checkSize);
  $("height").addEventListener("input", checkSize);
  for (const id of ["seed-random", "seed-fixed"]) {
    $(id).addEventListener("change", () => {
      $("seed").disabled = !$("seed-fixed").checked;
    });
  }
  $("condition").addEventListener("change", showCondition);
  $("condition-clear").addEventListener("click", clearCondition);
  $("generate-form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("use-condition").addEventListener("click", useAsCondition);
  $("gallery-refresh").addEventListener("click", loadGallery);
  start();
});
