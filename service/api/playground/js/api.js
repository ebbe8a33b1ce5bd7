// The API client: JSON routes, the /stream reader, and the API key, kept for this tab only.

import { readEvents } from "./sse.js";

const KEY_STORAGE = "gptserve.apiKey";

// An error the server answered, in its one shape {"error": {message, type, param, code}}.
export class ApiError extends Error {
  constructor(status, error, retryAfter = null) {
    super(error.message || `the server answered ${status}`);
    this.name = "ApiError";
    this.status = status; // 0 for an error event after the stream started
    this.type = error.type ?? null;
    this.param = error.param ?? null;
    this.code = error.code ?? null;
    this.retryAfter = retryAfter;
  }
}

// The stream ended (or the connection broke) before its `data: [DONE]`.
export class StreamCutError extends Error {
  constructor(detail) {
    super(detail);
    this.name = "StreamCutError";
  }
}

async function errorOf(response) {
  const retryAfter = response.headers.get("Retry-After");
  const text = await response.text();
  let error;
  try {
    error = JSON.parse(text).error;
  } catch {
    error = null;
  }
  if (!error || typeof error.message !== "string") {
    // Not this server's error shape (a proxy in between, say): show what came back.
    const message = `${response.status} ${response.statusText}: ${text.slice(0, 300)}`.trim();
    error = { message, type: null, param: null, code: null };
  }
  return new ApiError(response.status, error, retryAfter);
}

export class ApiClient {
  // `base` is the page's own address, so the page also works behind a path prefix.
  constructor(base = document.baseURI) {
    this.base = base;
  }

  url(path) {
    return new URL(path, this.base).href;
  }

  get key() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  set key(value) {
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  }

  headers(extra = {}) {
    const headers = { Accept: "application/json", ...extra };
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    return headers;
  }

  async getJSON(path) {
    const response = await fetch(this.url(path), { headers: this.headers() });
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  // POST `body` to a Server-Sent Events route and yield each event as an object. Throws an
  // ApiError for an error answer or an error event, a StreamCutError when the stream ends
  // without [DONE], and the fetch's AbortError when `signal` aborts.
  async *stream(path, body, signal) {
    const response = await fetch(this.url(path), {
      method: "POST",
      headers: this.headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(body),
      signal,
    });
    if (!response.ok) throw await errorOf(response);
    try {
      for await (const data of readEvents(response.body)) {
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(0, event.error);
        yield event;
      }
    } catch (err) {
      if (err instanceof ApiError || signal?.aborted) throw err;
      throw new StreamCutError(`the stream broke off (${err.message})`);
    }
    throw new StreamCutError("the server closed the stream before it finished");
  }
}
