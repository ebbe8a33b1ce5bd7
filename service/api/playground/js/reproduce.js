// The request that produced the output, as a curl command (the same /stream body) and as Python
// with the openai client (the same settings on /v1/completions, which gives the same tokens).
// An API key is never written out: the snippets read it from GPTSERVE_API_KEY.

// Fields of /generate that the openai client takes as its own arguments; the rest go in
// extra_body, except the ones that only shape the log-probabilities shown by the page.
const OPENAI_ARGUMENTS = ["temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias"];
const PAGE_ONLY = new Set(["prompt", "max_new_tokens", "logprobs", "logprobs_mode", "prompt_logprobs"]);

function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

export function curlCommand(url, body, hasKey) {
  const lines = [`curl -sN ${shellQuote(url)}`, `-H 'Content-Type: application/json'`];
  if (hasKey) lines.push(`-H "Authorization: Bearer $GPTSERVE_API_KEY"`);
  lines.push(`-d ${shellQuote(JSON.stringify(body))}`);
  return lines.join(" \\\n  ");
}

// A JSON value as a Python literal: JSON's strings are Python's, its constants are not.
export function pythonLiteral(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return Number.isFinite(value) ? String(value) : `float("${value}")`;
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) return `[${value.map(pythonLiteral).join(", ")}]`;
  const items = Object.entries(value).map(([key, item]) => `${JSON.stringify(key)}: ${pythonLiteral(item)}`);
  return `{${items.join(", ")}}`;
}

export function pythonSnippet(baseUrl, model, body, hasKey) {
  const args = [`model=${pythonLiteral(model)}`, `prompt=${pythonLiteral(body.prompt)}`];
  // The page always sends max_new_tokens: /generate's default differs from the completions API's.
  if ("max_new_tokens" in body) args.push(`max_tokens=${pythonLiteral(body.max_new_tokens)}`);
  for (const name of OPENAI_ARGUMENTS) {
    if (name in body) args.push(`${name}=${pythonLiteral(body[name])}`);
  }
  const extra = Object.fromEntries(
    Object.entries(body).filter(([name]) => !PAGE_ONLY.has(name) && !OPENAI_ARGUMENTS.includes(name)),
  );
  if (Object.keys(extra).length) args.push(`extra_body=${pythonLiteral(extra)}`);
  const lines = ["from openai import OpenAI", ""];
  if (hasKey) {
    lines.splice(0, 0, "import os", "");
    lines.push(`client = OpenAI(base_url=${pythonLiteral(baseUrl)}, api_key=os.environ["GPTSERVE_API_KEY"])`);
  } else {
    lines.push(`client = OpenAI(base_url=${pythonLiteral(baseUrl)}, api_key="unused")`);
  }
  lines.push("completion = client.completions.create(");
  for (const arg of args) lines.push(`    ${arg},`);
  lines.push(")", "print(completion.choices[0].text)");
  return lines.join("\n");
}
