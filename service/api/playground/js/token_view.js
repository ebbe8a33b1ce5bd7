// The output: the prompt, then every generated token as a span tinted by its probability. The
// tokens are one stop for the Tab key; the arrow keys, Home and End move between them, and the
// focused (or hovered) token is handed to `onSelect`.

import { probability } from "./distribution.js";

// Where a probability sits on the tint scale, by its order of magnitude: 1 is 1, 10% is 0.75,
// 1% is 0.5, 0.1% is 0.25, 0.01% and below are 0; a linear scale would paint nearly every
// token of a real model the same colour.
export const TINT_DECADES = 4;

export function tintOf(p) {
  if (p <= 0) return 0;
  return Math.min(Math.max(1 + Math.log10(p) / TINT_DECADES, 0), 1);
}

export class TokenView {
  constructor(container, onSelect) {
    this.container = container;
    this.onSelect = onSelect;
    this.records = []; // {kind: "prompt" | "generated", step, entry, span}
    this.tint = "raw";
    this.current = -1;
    container.addEventListener("mouseover", (event) => {
      const span = event.target.closest?.(".tok");
      if (span) this.select(Number(span.dataset.index), false);
    });
    container.addEventListener("focusin", (event) => {
      const span = event.target.closest?.(".tok");
      if (span) this.select(Number(span.dataset.index), false);
    });
    container.addEventListener("keydown", (event) => this.onKey(event));
  }

  reset(promptText) {
    this.records = [];
    this.current = -1;
    const prompt = document.createElement("span");
    prompt.className = "prompt-text";
    prompt.textContent = promptText;
    this.container.replaceChildren(prompt);
  }

  // Replace the plain prompt by its tokens, each with its log-probability given those before it.
  setPromptTokens(entries) {
    const plain = this.container.querySelector(".prompt-text");
    const spans = entries.map((entry, step) => this.makeSpan("prompt", step, entry, entry.token));
    if (plain) plain.replaceWith(...spans);
    else this.container.prepend(...spans);
    // Prompt records come first, whatever arrived before them.
    const generated = this.records.filter((record) => record.kind === "generated");
    this.records = [...this.records.filter((r) => r.kind === "prompt"), ...generated];
    this.reindex();
  }

  addToken(token) {
    const step = this.records.filter((record) => record.kind === "generated").length;
    const span = this.makeSpan("generated", step, token, token.text);
    this.container.append(span);
    if (!this.container.querySelector('.tok[tabindex="0"]')) span.tabIndex = 0;
    return this.records.length - 1;
  }

  makeSpan(kind, step, entry, text) {
    const span = document.createElement("span");
    span.className = `tok ${kind === "prompt" ? "prompt" : "gen"}`;
    span.textContent = text;
    if (text === "") span.classList.add("partial"); // part of a character: its text comes later
    if (text.includes("\n")) span.classList.add("newline");
    span.tabIndex = -1;
    span.dataset.index = String(this.records.length);
    span.dataset.step = String(step);
    span.dataset.tokenId = String(kind === "prompt" ? entry.token_id : entry.id);
    this.records.push({ kind, step, entry, span });
    this.paint(this.records[this.records.length - 1]);
    return span;
  }

  reindex() {
    this.records.forEach((record, index) => {
      record.span.dataset.index = String(index);
    });
    if (!this.container.querySelector('.tok[tabindex="0"]') && this.records.length) {
      this.records[0].span.tabIndex = 0;
    }
  }

  // "raw": the model's probability; "processed": the one in the distribution sampled from.
  setTint(mode) {
    this.tint = mode;
    this.records.forEach((record) => this.paint(record));
  }

  paint(record) {
    const { entry, span } = record;
    const useProcessed = this.tint === "processed" && record.kind === "generated";
    const p = probability(useProcessed ? entry.processed_logprob : entry.logprob);
    if (p === null) {
      span.classList.remove("tinted");
      span.style.removeProperty("--tint");
    } else {
      span.classList.add("tinted");
      span.style.setProperty("--tint", tintOf(p).toFixed(4));
    }
  }

  // The generated text, as the spans hold it.
  generatedText() {
    return this.records
      .filter((record) => record.kind === "generated")
      .map((record) => record.span.textContent)
      .join("");
  }

  get numGenerated() {
    return this.records.filter((record) => record.kind === "generated").length;
  }

  select(index, focus = true) {
    const record = this.records[index];
    if (!record) return;
    if (this.current >= 0 && this.records[this.current]) {
      const previous = this.records[this.current].span;
      previous.classList.remove("selected");
      previous.tabIndex = -1;
    }
    this.current = index;
    record.span.classList.add("selected");
    record.span.tabIndex = 0;
    if (focus) record.span.focus();
    this.onSelect(record);
  }

  onKey(event) {
    if (!event.target.classList?.contains("tok")) return;
    const index = Number(event.target.dataset.index);
    const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: this.records.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const target = Math.min(Math.max(moves[event.key], 0), this.records.length - 1);
    this.select(target);
  }
}
