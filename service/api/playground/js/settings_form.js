// The settings form, built from the server's /v1/config: one input per field of /generate, with
// the server's default and range. Nothing here knows a limit: the server's answer decides, and
// its 400 names the field, which the form then marks.

// How the form groups the fields it knows; a field the server adds later lands in "Other".
const GROUPS = [
  ["Length", ["max_new_tokens", "min_tokens", "ignore_eos"]],
  ["Sampling", ["temperature", "top_k", "top_p", "min_p", "seed"]],
  ["Penalties and bias", ["repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"]],
  ["Stop", ["stop", "stop_token_ids", "include_stop_str_in_output"]],
  ["Log-probabilities", ["logprobs", "prompt_logprobs"]],
  ["Scheduling", ["priority", "timeout"]],
];

// The inspect panel needs the alternatives of every token, raw and processed.
export const LOGPROBS_MODE = "raw_and_processed_logprobs";
const PAGE_DEFAULTS = { logprobs: 10, prompt_logprobs: 10 };
const PAGE_OWNED = new Set(["prompt", "logprobs_mode"]);
// Sent even at their defaults, so a copied request says what produced the output.
const ALWAYS_SENT = new Set(["max_new_tokens", "temperature", "seed", "logprobs"]);

const LABELS = {
  max_new_tokens: "Max new tokens",
  min_tokens: "Min tokens",
  ignore_eos: "Ignore end-of-text",
  top_k: "Top-k",
  top_p: "Top-p",
  min_p: "Min-p",
  logit_bias: "Logit bias",
  stop: "Stop strings",
  stop_token_ids: "Stop token ids",
  include_stop_str_in_output: "Keep the stop string",
  logprobs: "Alternatives per token",
  prompt_logprobs: "Alternatives per prompt token",
  timeout: "Timeout (s)",
};

// A value the page itself cannot turn into a request: named like the server's errors.
export class FormError extends Error {
  constructor(param, message) {
    super(`${param}: ${message}`);
    this.name = "FormError";
    this.param = param;
  }
}

function label(name) {
  return LABELS[name] ?? name[0].toUpperCase() + name.slice(1).replaceAll("_", " ");
}

function formatNumber(value) {
  if (Math.abs(value) >= 1e15) return value.toExponential(2);
  return String(value);
}

function formatDefault(spec, fallback) {
  const value = fallback ?? spec.default;
  if (value === null || value === undefined) return "none";
  if (typeof value === "object") return JSON.stringify(value);
  return typeof value === "number" ? formatNumber(value) : String(value);
}

function formatRange(spec) {
  const { minimum: low, maximum: high, exclusive_minimum: open } = spec;
  if (low !== null && high !== null) {
    return `${open ? "(" : "["}${formatNumber(low)}, ${formatNumber(high)}]`;
  }
  if (low !== null) return `${open ? ">" : "≥"} ${formatNumber(low)}`;
  if (high !== null) return `≤ ${formatNumber(high)}`;
  return "";
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// "a\nb" typed as a\nb: the escapes a stop string may need on one line.
function unescapeText(text) {
  return text.replace(/\\([nrt\\])/g, (_, c) => ({ n: "\n", r: "\r", t: "\t", "\\": "\\" })[c]);
}

function escapeText(text) {
  return text.replace(/[\\\n\r\t]/g, (c) => ({ "\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\" })[c]);
}

// Which input a field gets, from the JSON types the server lists for it.
function kindOf(spec) {
  const types = new Set(spec.types);
  if (spec.choices) return "choice";
  if (types.has("boolean")) return "boolean";
  if (types.has("object")) return "json"; // logit_bias
  if (types.has("array")) return types.has("string") ? "lines" : "ids"; // stop, stop_token_ids
  if (types.has("integer")) return "integer";
  if (types.has("number")) return "number";
  return "text";
}

// One input for one field: how it is drawn, read and reset.
class FieldInput {
  constructor(spec, config) {
    this.spec = spec;
    this.name = spec.name;
    this.initial = PAGE_DEFAULTS[spec.name] ?? spec.default;
    this.kind = kindOf(spec);
    this.id = `field-${spec.name}`;
    this.input = this.build(config);
    this.reset();
  }

  build(config) {
    const { spec, id } = this;
    const common = { id, name: spec.name, "aria-describedby": `${id}-hint` };
    switch (this.kind) {
      case "choice":
        return element("select", common, ...spec.choices.map((c) => element("option", { value: c }, c)));
      case "boolean":
        return element("input", { ...common, type: "checkbox" });
      case "json":
        return element("textarea", { ...common, rows: 2, spellcheck: "false", placeholder: '{"50256": -100}' });
      case "lines":
        return element("textarea", { ...common, rows: 2, spellcheck: "false", placeholder: "one per line; \\n is a newline" });
      case "ids":
        return element("input", { ...common, type: "text", inputmode: "numeric", placeholder: "e.g. 198, 50256" });
      case "integer":
      case "number": {
        const integer = this.kind === "integer";
        const attributes = { ...common, type: "number", step: integer ? "1" : "any" };
        // Bounds a JavaScript number holds exactly; the seed's go beyond them.
        if (spec.minimum !== null && !spec.exclusive_minimum && Number.isSafeInteger(Math.trunc(spec.minimum))) {
          attributes.min = spec.minimum;
        }
        const maximum = spec.name === "max_new_tokens" ? config.max_model_len : spec.maximum;
        if (maximum !== null && Number.isSafeInteger(Math.trunc(maximum))) attributes.max = maximum;
        if (spec.types.includes("null")) attributes.placeholder = spec.name === "seed" ? "random" : "none";
        return element("input", attributes);
      }
      default:
        return element("input", { ...common, type: "text" });
    }
  }

  hint(config) {
    const parts = [element("code", {}, this.name), `default ${formatDefault(this.spec)}`];
    if (this.initial !== this.spec.default) parts.push(`the page sends ${formatDefault(this.spec, this.initial)}`);
    const range = formatRange(this.spec);
    if (range) parts.push(this.name === "logit_bias" ? `each bias ${range}` : range);
    if (this.name === "max_new_tokens") parts.push(`context window ${config.max_model_len} tokens`);
    if (this.name === "logit_bias" || this.name === "stop_token_ids") parts.push(`token ids < ${config.vocab_size}`);
    const line = element("span", { class: "hint-values" });
    parts.forEach((part, i) => line.append(...(i ? [" · ", part] : [part])));
    return element("p", { class: "hint", id: `${this.id}-hint` }, this.spec.description, element("br"), line);
  }

  render(config) {
    const isCheck = this.kind === "boolean";
    const labelNode = element("label", { for: this.id }, label(this.name));
    const row = isCheck ? element("div", { class: "check" }, this.input, labelNode) : element("div", { class: "control" }, labelNode, this.input);
    return element("div", { class: "field", "data-field": this.name }, row, this.hint(config));
  }

  reset() {
    const value = this.initial;
    if (this.kind === "boolean") this.input.checked = Boolean(value);
    else if (value === null || value === undefined) this.input.value = "";
    else if (this.kind === "json") this.input.value = JSON.stringify(value);
    else if (this.kind === "lines") this.input.value = [].concat(value).map(escapeText).join("\n");
    else if (this.kind === "ids") this.input.value = value.join(", ");
    else this.input.value = String(value);
    this.markInvalid(false);
  }

  // The value to send, or undefined for "leave it out".
  read() {
    const raw = this.kind === "boolean" ? this.input.checked : this.input.value.trim();
    switch (this.kind) {
      case "boolean":
        return raw;
      case "choice":
        return raw;
      case "json":
        if (!raw) return undefined;
        try {
          return JSON.parse(raw);
        } catch (err) {
          throw new FormError(this.name, `not valid JSON (${err.message})`);
        }
      case "lines": {
        const lines = this.input.value.split("\n").filter((line) => line !== "").map(unescapeText);
        return lines.length ? lines : undefined;
      }
      case "ids": {
        if (!raw) return undefined;
        // Anything that is not an integer goes as typed: the server's 400 says what is wrong.
        return raw.split(/[\s,]+/).filter(Boolean).map((piece) => (/^-?\d+$/.test(piece) ? Number(piece) : piece));
      }
      case "integer":
      case "number": {
        if (this.input.validity.badInput) throw new FormError(this.name, "not a number");
        // Cleared: null where the field takes it (max_new_tokens: up to the context window).
        if (!raw) return this.spec.types.includes("null") ? null : undefined;
        const value = Number(raw);
        if (this.kind === "integer" && Number.isInteger(value) && !Number.isSafeInteger(value)) {
          throw new FormError(this.name, `the page sends integers up to ${Number.MAX_SAFE_INTEGER} exactly; use a smaller one`);
        }
        return value;
      }
      default:
        return raw || undefined;
    }
  }

  markInvalid(invalid) {
    if (invalid) this.input.setAttribute("aria-invalid", "true");
    else this.input.removeAttribute("aria-invalid");
  }
}

export class SettingsForm {
  constructor(form) {
    this.form = form;
    this.fields = new Map();
    this.config = null;
    // A field edited after an error is no longer the one marked wrong.
    form.addEventListener("input", (event) => event.target.removeAttribute?.("aria-invalid"));
  }

  // Draw the form for the server's configuration (again, if it changed).
  render(config) {
    this.config = config;
    this.fields.clear();
    const specs = new Map(config.generate_fields.filter((s) => !PAGE_OWNED.has(s.name)).map((s) => [s.name, s]));
    const groups = GROUPS.map(([title, names]) => [title, names.filter((n) => specs.has(n))]);
    const known = new Set(GROUPS.flatMap(([, names]) => names));
    groups.push(["Other", [...specs.keys()].filter((n) => !known.has(n))]);
    const sections = [];
    for (const [title, names] of groups) {
      if (!names.length) continue;
      const inputs = names.map((name) => new FieldInput(specs.get(name), config));
      inputs.forEach((input) => this.fields.set(input.name, input));
      const open = title !== "Scheduling" && title !== "Other";
      sections.push(
        element(
          "details",
          { class: "group", open },
          element("summary", {}, title),
          ...inputs.map((input) => input.render(config)),
        ),
      );
    }
    const mode = element(
      "p",
      { class: "hint page-note" },
      "The page asks for ",
      element("code", {}, `logprobs_mode: "${LOGPROBS_MODE}"`),
      ": each token's alternatives under the model's softmax and under the distribution it was drawn from.",
    );
    const reset = element("button", { type: "button", class: "quiet" }, "Reset to defaults");
    reset.addEventListener("click", () => this.reset());
    this.form.replaceChildren(...sections, mode, reset);
  }

  reset() {
    for (const field of this.fields.values()) field.reset();
  }

  field(name) {
    return this.fields.get(name);
  }

  // The body of /stream for `prompt`; a blank seed gets a fresh random one, so every run can be
  // repeated. Fields at their defaults are left out, except those a reader wants to see.
  requestBody(prompt) {
    this.clearInvalid();
    const body = { prompt };
    for (const field of this.fields.values()) {
      let value;
      try {
        value = field.read();
      } catch (err) {
        field.markInvalid(true);
        throw err;
      }
      if (field.name === "seed" && (value === undefined || value === null)) value = Math.floor(Math.random() * 2 ** 31);
      if (value === undefined) continue;
      const isDefault = JSON.stringify(value) === JSON.stringify(field.spec.default);
      if (isDefault && !ALWAYS_SENT.has(field.name)) continue;
      body[field.name] = value;
    }
    body.logprobs_mode = LOGPROBS_MODE;
    return body;
  }

  clearInvalid() {
    for (const field of this.fields.values()) field.markInvalid(false);
  }

  // Mark the field a server error or a FormError names; returns whether the form has it.
  markInvalid(param) {
    const field = param && this.fields.get(param);
    if (!field) return false;
    field.markInvalid(true);
    field.input.closest("details").open = true;
    return true;
  }
}
