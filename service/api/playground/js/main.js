// The playground's wiring: load the server's configuration, build the form, stream a
// generation into the token view, and report what happened.

import { ApiClient, ApiError, StreamCutError } from "./api.js";
import { InspectPanel } from "./inspect_panel.js";
import { curlCommand, pythonSnippet } from "./reproduce.js";
import { FormError, SettingsForm } from "./settings_form.js";
import { TokenView } from "./token_view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  serviceInfo: $("service-info"),
  keyButton: $("key-button"),
  prompt: $("prompt"),
  generate: $("generate"),
  stop: $("stop"),
  runState: $("run-state"),
  error: $("error"),
  tint: $("tint"),
  stats: $("stats"),
  curl: $("request-curl"),
  python: $("request-python"),
  copyCurl: $("copy-curl"),
  copyPython: $("copy-python"),
  copyState: $("copy-state"),
  keyDialog: $("key-dialog"),
  keyInput: $("key-input"),
  keyMessage: $("key-message"),
};

const api = new ApiClient();
const form = new SettingsForm($("settings"));
const panel = new InspectPanel($("inspect"));
const view = new TokenView($("tokens"), (record) => panel.show(record));
let config = null;
let controller = null;
let pendingKey = null; // {resolve, reject} while the key dialog is open

function setState(state, text) {
  document.body.dataset.state = state;
  ui.runState.textContent = text;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

// Any failure, as the server worded it: never a silent one.
function showError(err, run = null) {
  let title;
  let message = err.message;
  if (err instanceof ApiError && err.status > 0) {
    title = `The server answered ${err.status}${err.code ? ` (${err.code})` : ""}`;
    if (err.retryAfter) message += ` Retry after ${err.retryAfter} s.`;
  } else if (err instanceof ApiError) {
    title = "The generation failed after it started";
  } else if (err instanceof StreamCutError) {
    const count = run ? run.count : 0;
    title = "The stream was cut off";
    message = `${err.message}, after ${count} token${count === 1 ? "" : "s"}: the output is incomplete.`;
  } else if (err instanceof FormError) {
    title = "A setting cannot be sent";
  } else {
    title = "The server could not be reached";
  }
  if (err.param && form.markInvalid(err.param)) message += ` (see the “${err.param}” setting)`;
  const heading = document.createElement("strong");
  heading.textContent = title;
  const text = document.createElement("span");
  text.className = "error-message";
  text.textContent = message;
  ui.error.replaceChildren(heading, " ", text);
  ui.error.hidden = false;
}

function askForKey(message) {
  ui.keyButton.hidden = false;
  ui.keyMessage.textContent = message;
  ui.keyInput.value = "";
  ui.keyDialog.returnValue = "";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  pendingKey?.reject(new Error("asked again"));
  return new Promise((resolve, reject) => {
    pendingKey = { resolve, reject };
  });
}

ui.keyDialog.addEventListener("close", () => {
  const waiting = pendingKey;
  pendingKey = null;
  if (ui.keyDialog.returnValue === "save" && ui.keyInput.value.trim()) {
    api.key = ui.keyInput.value.trim();
    waiting?.resolve();
  } else {
    waiting?.reject(new Error("no API key given"));
  }
});

$("key-cancel").addEventListener("click", () => ui.keyDialog.close("cancel"));
ui.keyButton.addEventListener("click", () => {
  askForKey("The key is kept for this tab only.").then(loadConfig, () => {});
});

function renderServiceInfo(cfg) {
  const facts = [
    ["model", cfg.model],
    ["device", cfg.device],
    ["dtype", cfg.quantization === "none" ? cfg.dtype : `${cfg.dtype}, ${cfg.quantization}`],
    ["context", `${cfg.max_model_len} tokens`],
  ];
  ui.serviceInfo.replaceChildren(
    ...facts.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.fact = name;
      return [dt, dd];
    }),
  );
}

async function loadConfig() {
  setState("loading", "Connecting…");
  try {
    config = await api.getJSON("v1/config");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      setState("needs-key", "This server needs an API key");
      askForKey(err.message).then(loadConfig, () => showError(err));
      return;
    }
    showError(err);
    if (!(err instanceof ApiError) || err.status === 503) {
      setState("loading", "Waiting for the server…");
      setTimeout(loadConfig, 2000);
    } else {
      setState("error", "The configuration did not load");
    }
    return;
  }
  clearError();
  renderServiceInfo(config);
  form.render(config);
  panel.setDefaults(config);
  ui.generate.disabled = false;
  setState("ready", "Ready");
}

function updateSnippets(body) {
  const hasKey = Boolean(api.key);
  ui.curl.textContent = curlCommand(api.url("stream"), body, hasKey);
  ui.python.textContent = pythonSnippet(api.url("v1"), config.model, body, hasKey);
  ui.copyCurl.disabled = false;
  ui.copyPython.disabled = false;
  ui.copyState.textContent = "";
}

async function copy(pre, what) {
  try {
    await navigator.clipboard.writeText(pre.textContent);
    ui.copyState.textContent = `${what} copied`;
  } catch {
    // No clipboard access (an insecure origin, say): select the text for Ctrl+C instead.
    pre.closest("details").open = true;
    getSelection().selectAllChildren(pre);
    ui.copyState.textContent = `${what} selected: press Ctrl+C to copy`;
  }
}

ui.copyCurl.addEventListener("click", () => copy(ui.curl, "curl command"));
ui.copyPython.addEventListener("click", () => copy(ui.python, "Python code"));

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function showStats(run) {
  const parts = [];
  if (run.first !== null) parts.push(`first token after ${formatMs(run.first - run.start)}`);
  // Over the whole run: events arrive in bursts, so the gaps between tokens say little.
  const elapsed = run.end - run.start;
  if (run.count && elapsed > 0) {
    parts.push(`${run.count} tokens in ${formatMs(elapsed)} (${(run.count / (elapsed / 1000)).toFixed(1)} tokens/s)`);
  }
  const usage = run.final?.usage;
  if (usage) {
    const cached = usage.prompt_tokens_details?.cached_tokens;
    const plural = usage.prompt_tokens === 1 ? "" : "s";
    parts.push(`${usage.prompt_tokens} prompt token${plural}${cached ? ` (${cached} cached)` : ""}`);
    parts.push(`${usage.completion_tokens} generated`);
  }
  if (run.final?.finish_reason) parts.push(`finish: ${run.final.finish_reason}`);
  parts.push(`seed ${run.body.seed}`);
  const keep = document.createElement("button");
  keep.type = "button";
  keep.className = "quiet";
  keep.textContent = "Keep this seed";
  keep.addEventListener("click", () => {
    form.field("seed").input.value = String(run.body.seed);
  });
  ui.stats.replaceChildren(parts.join(" · "), " ", keep);
  ui.stats.dataset.tokens = String(run.count);
}

function setRunning(running) {
  ui.generate.disabled = running || !config;
  ui.stop.disabled = !running;
}

async function generate() {
  if (controller || !config) return;
  clearError();
  let body;
  try {
    body = form.requestBody(ui.prompt.value);
  } catch (err) {
    showError(err);
    return;
  }
  controller = new AbortController();
  const signal = controller.signal;
  const run = { body, start: performance.now(), first: null, end: null, count: 0, final: null };
  view.reset(body.prompt);
  panel.startRun(body);
  updateSnippets(body);
  ui.stats.replaceChildren();
  setRunning(true);
  setState("running", "Generating…");
  try {
    for await (const event of api.stream("stream", body, signal)) {
      if (event.prompt_logprobs) view.setPromptTokens(event.prompt_logprobs);
      if (event.token) {
        run.first ??= performance.now();
        run.count += 1;
        view.addToken(event.token);
      }
      if ("finish_reason" in event) run.final = event;
    }
    setState("done", `Done (${run.final?.finish_reason ?? "finished"})`);
  } catch (err) {
    if (signal.aborted) {
      setState("stopped", `Stopped after ${run.count} token${run.count === 1 ? "" : "s"}`);
    } else if (err instanceof ApiError && err.status === 401) {
      setState("needs-key", "This server needs an API key");
      showError(err);
      controller = null;
      askForKey(err.message).then(generate, () => {});
    } else {
      setState("error", "Failed");
      showError(err, run);
    }
  } finally {
    run.end = performance.now();
    controller = null;
    setRunning(false);
    showStats(run);
  }
}

function stop() {
  controller?.abort();
}

ui.generate.addEventListener("click", generate);
ui.stop.addEventListener("click", stop);
ui.tint.addEventListener("change", () => view.setTint(ui.tint.value));
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    generate();
  } else if (event.key === "Escape" && controller && !ui.keyDialog.open) {
    stop();
  }
});

setRunning(false);
loadConfig();
