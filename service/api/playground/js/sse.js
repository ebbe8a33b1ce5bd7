// Server-Sent Events from a fetch() body: EventSource cannot POST, so the stream is parsed here.
// Yields the data of each event (multi-line data joined with "\n"); comments such as
// ": keep-alive" and fields other than data are skipped.

const LINE_END = /\r\n|\r|\n/;

export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      for (;;) {
        const match = LINE_END.exec(buffer);
        // A "\r" that ends the chunk may be the first half of "\r\n": wait for the next one.
        if (!match || (match[0] === "\r" && match.index === buffer.length - 1)) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    }
  } finally {
    // Stops reading (and closes the connection) when the caller leaves early.
    reader.cancel().catch(() => {});
  }
}
