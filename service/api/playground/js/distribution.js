// The arithmetic of the inspect panel: probabilities from log-probabilities, and the
// distribution a temperature makes of them.

// exp(logprob), or null when the API sent null (a candidate cut off, or no value).
export function probability(logprob) {
  return logprob === null || logprob === undefined ? null : Math.exp(logprob);
}

// softmax(logprob / T) over the given log-probabilities (renormalised over them alone); T = 0
// is greedy: all the mass on the most likely (the first of equals). Entries that are null
// (no value) stay null.
export function withTemperature(logprobs, temperature) {
  const present = logprobs.filter((lp) => lp !== null && lp !== undefined);
  if (!present.length) return logprobs.map(() => null);
  const best = Math.max(...present);
  if (temperature <= 0) {
    const first = logprobs.indexOf(best);
    return logprobs.map((lp, i) => (lp === null || lp === undefined ? null : i === first ? 1 : 0));
  }
  // Shifting by the largest keeps exp() in range at small temperatures.
  const weights = logprobs.map((lp) =>
    lp === null || lp === undefined ? null : Math.exp((lp - best) / temperature),
  );
  const total = weights.reduce((sum, w) => sum + (w ?? 0), 0);
  return weights.map((w) => (w === null ? null : w / total));
}

// "12.3%", "0.0412%", "2.10e-7%": three significant digits, for probabilities in [0, 1].
export function formatPercent(p) {
  if (p === null || p === undefined) return "–";
  const percent = p * 100;
  if (percent === 0) return "0%";
  if (percent >= 99.95 && percent < 100) return `${percent.toFixed(2)}%`;
  if (percent >= 0.001) return `${Number(percent.toPrecision(3))}%`;
  return `${percent.toExponential(2)}%`;
}
