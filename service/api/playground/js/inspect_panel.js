// The inspect panel: the alternatives the model weighed at one step, side by side under the
// model's raw softmax and under the distribution the token was drawn from (after bias,
// penalties, temperature and top-k / top-p / min-p), and a "what if" temperature that redraws
// the step from the raw log-probabilities without a new request.

import { formatPercent, probability, withTemperature } from "./distribution.js";

// Whitespace made visible, so " the" and "the" do not look alike.
export function visibleText(text) {
  if (text === "") return "(part of a character)";
  return text.replaceAll(" ", "␣").replaceAll("\n", "↵").replaceAll("\t", "⇥");
}

function cell(className, p, text = formatPercent(p)) {
  const td = document.createElement("td");
  td.className = `p ${className}`;
  if (p !== null && p !== undefined) td.dataset.p = String(p);
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.setProperty("--w", `${Math.min(Math.max(p ?? 0, 0), 1) * 100}%`);
  bar.append(fill);
  const value = document.createElement("span");
  value.className = "num";
  value.textContent = text;
  td.append(value, bar);
  return td;
}

function formatTemperature(t) {
  return Number(t).toFixed(2);
}

// The request's filters, in words: what turned the model's softmax into the distribution drawn from.
function describeFilters(body, defaults) {
  const value = (name) => (body[name] ?? defaults[name]);
  const parts = [];
  const temperature = value("temperature") ?? 1;
  parts.push(temperature === 0 ? "greedy (temperature 0)" : `temperature ${temperature}`);
  if (value("top_k") > 0) parts.push(`top-k ${value("top_k")}`);
  if (value("top_p") !== null && value("top_p") < 1) parts.push(`top-p ${value("top_p")}`);
  if (value("min_p") > 0) parts.push(`min-p ${value("min_p")}`);
  if (value("repetition_penalty") !== 1) parts.push(`repetition penalty ${value("repetition_penalty")}`);
  if (value("presence_penalty")) parts.push(`presence penalty ${value("presence_penalty")}`);
  if (value("frequency_penalty")) parts.push(`frequency penalty ${value("frequency_penalty")}`);
  if (body.logit_bias && Object.keys(body.logit_bias).length) parts.push("logit bias");
  return parts.join(" · ");
}

export class InspectPanel {
  constructor(root) {
    this.root = root;
    this.empty = root.querySelector("#inspect-empty");
    this.content = root.querySelector("#inspect-content");
    this.where = root.querySelector("#inspect-where");
    this.token = root.querySelector("#inspect-token");
    this.summary = root.querySelector("#inspect-summary");
    this.filters = root.querySelector("#inspect-filters");
    this.table = root.querySelector("#inspect-table");
    this.rowsBody = this.table.querySelector("tbody");
    this.note = root.querySelector("#inspect-note");
    this.slider = root.querySelector("#what-if-temperature");
    this.sliderValue = root.querySelector("#what-if-value");
    this.columnValue = root.querySelector("#what-if-column");
    this.resetButton = root.querySelector("#what-if-reset");
    this.defaults = {};
    this.body = {};
    this.rows = [];
    this.slider.addEventListener("input", () => this.redraw());
    this.resetButton.addEventListener("click", () => {
      this.setSlider(this.runTemperature());
      this.redraw();
    });
  }

  // The server's defaults of /generate, to describe a request that left fields out.
  setDefaults(config) {
    this.defaults = Object.fromEntries(config.generate_fields.map((spec) => [spec.name, spec.default]));
  }

  runTemperature() {
    return this.body.temperature ?? this.defaults.temperature ?? 1;
  }

  // A new run: forget the shown step; the what-if temperature starts at the request's.
  startRun(body) {
    this.body = body;
    this.setSlider(this.runTemperature());
    this.clear();
  }

  setSlider(temperature) {
    this.slider.value = String(temperature);
    this.showTemperature();
  }

  showTemperature() {
    const text = formatTemperature(this.slider.value);
    this.sliderValue.textContent = text;
    this.columnValue.textContent = text;
  }

  clear() {
    this.rows = [];
    this.empty.hidden = false;
    this.content.hidden = true;
  }

  show(record) {
    this.empty.hidden = true;
    this.content.hidden = false;
    if (record.kind === "prompt") this.showPrompt(record);
    else this.showGenerated(record);
    this.redraw();
  }

  showGenerated({ step, entry }) {
    this.where.textContent = `Generated token ${step + 1}`;
    this.token.textContent = visibleText(entry.text);
    this.token.title = `token id ${entry.id}`;
    this.root.dataset.kind = "generated";
    this.root.dataset.step = String(step);
    const greedy = (this.runTemperature() ?? 1) === 0;
    const raw = formatPercent(probability(entry.logprob));
    const processed = formatPercent(probability(entry.processed_logprob));
    if (entry.logprob === null || entry.logprob === undefined) {
      this.summary.textContent = `Token id ${entry.id}. This run did not ask for log-probabilities (set “Alternatives per token”).`;
    } else if (greedy) {
      this.summary.textContent = `Token id ${entry.id}, the most likely after bias and penalties: ${raw} under the model. Greedy decoding draws nothing; “sampled from” shows that distribution at temperature 1 with the filters.`;
    } else {
      this.summary.textContent = `Token id ${entry.id}, drawn with ${processed} from the distribution sampled from; the model alone gave it ${raw}.`;
    }
    this.filters.textContent = describeFilters(this.body, this.defaults);
    this.table.classList.remove("no-processed");
    this.rows = (entry.top_logprobs ?? []).map((top) => ({
      tokenId: top.token_id,
      text: top.token,
      logprob: top.logprob,
      processedLogprob: top.processed_logprob ?? null,
      isChosen: top.token_id === entry.id,
    }));
    if (!this.rows.some((row) => row.isChosen) && entry.logprob !== null && entry.logprob !== undefined) {
      this.rows.push({
        tokenId: entry.id,
        text: entry.text,
        logprob: entry.logprob,
        processedLogprob: entry.processed_logprob ?? null,
        isChosen: true,
        isOutside: true,
      });
    }
    this.renderRows("drawn");
    this.note.textContent = this.rows.length
      ? `The ${this.rows.length} most likely tokens under the model. “Cut off”: removed by the request's filters before the draw.`
      : "";
  }

  showPrompt({ step, entry }) {
    this.where.textContent = `Prompt token ${step + 1}`;
    this.token.textContent = visibleText(entry.token);
    this.token.title = `token id ${entry.token_id}`;
    this.root.dataset.kind = "prompt";
    this.root.dataset.step = String(step);
    this.filters.textContent = "";
    this.table.classList.add("no-processed");
    if (entry.logprob === null || entry.logprob === undefined) {
      this.summary.textContent = `Token id ${entry.token_id}, the first of the prompt: nothing comes before it to predict it from.`;
      this.rows = [];
    } else {
      this.summary.textContent = `Token id ${entry.token_id}: the model gave it ${formatPercent(probability(entry.logprob))} after the tokens before it (rank ${entry.rank}).`;
      this.rows = (entry.top_logprobs ?? []).map((top) => ({
        tokenId: top.token_id,
        text: top.token,
        logprob: top.logprob,
        processedLogprob: null,
        isChosen: top.token_id === entry.token_id,
      }));
      if (!this.rows.some((row) => row.isChosen)) {
        this.rows.push({ tokenId: entry.token_id, text: entry.token, logprob: entry.logprob, processedLogprob: null, isChosen: true, isOutside: true, rank: entry.rank });
      }
    }
    this.renderRows("in the prompt");
    this.note.textContent = this.rows.length ? `What the model expected at this position: its ${this.rows.length} most likely tokens.` : "";
  }

  renderRows(chosenLabel) {
    const hasProcessed = !this.table.classList.contains("no-processed");
    const rows = this.rows.map((row, index) => {
      const tr = document.createElement("tr");
      tr.dataset.tokenId = String(row.tokenId);
      if (row.isChosen) tr.classList.add("chosen");
      if (row.isOutside) tr.classList.add("outside");
      const cut = hasProcessed && row.processedLogprob === null;
      if (cut) tr.classList.add("cut");
      const rank = document.createElement("td");
      rank.className = "rank";
      rank.textContent = row.isOutside ? (row.rank ? String(row.rank) : "…") : String(index + 1);
      const token = document.createElement("td");
      token.className = "token";
      const code = document.createElement("code");
      code.textContent = visibleText(row.text);
      code.title = `token id ${row.tokenId}`;
      token.append(code);
      if (row.isChosen) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = chosenLabel;
        token.append(" ", badge);
      }
      tr.append(rank, token, cell("raw", probability(row.logprob)));
      if (hasProcessed) {
        tr.append(cut ? cell("processed", null, "cut off") : cell("processed", probability(row.processedLogprob)));
      }
      tr.append(cell("what-if", null));
      return tr;
    });
    this.rowsBody.replaceChildren(...rows);
  }

  // The what-if column: softmax(log p / T) over the rows shown.
  redraw() {
    this.showTemperature();
    const temperature = Number(this.slider.value);
    const values = withTemperature(this.rows.map((row) => row.logprob), temperature);
    [...this.rowsBody.rows].forEach((tr, i) => {
      tr.cells[tr.cells.length - 1].replaceWith(cell("what-if", values[i]));
    });
  }
}
