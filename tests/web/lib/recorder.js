// A WebSocket relay that sits between GW3 clients and a gateway and keeps every frame, so a run
// against knit can be compared with the golden transcripts recorded against the reference
// gateway. Connections are labelled A, B, C ... in the order they are accepted.
"use strict";
const WebSocket = require("ws");

async function startRecorder(target) {
  const frames = [];
  const server = new WebSocket.WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((ok, fail) => { server.once("listening", ok); server.once("error", fail); });
  const pairs = new Map();
  let accepted = 0;
  const keep = (conn, dir, data) => {
    const text = data.toString();
    let msg;
    try { msg = JSON.parse(text); } catch { msg = text; }
    frames.push({ conn, dir, msg });
  };
  server.on("connection", (client) => {
    const conn = String.fromCharCode(65 + (accepted++ % 26)) + (accepted > 26 ? String(Math.floor((accepted - 1) / 26)) : "");
    const upstream = new WebSocket(target);
    const early = [];
    pairs.set(conn, [client, upstream]);
    client.on("message", (d) => {
      keep(conn, "c2g", d);
      if (upstream.readyState === WebSocket.OPEN) upstream.send(d.toString()); else early.push(d.toString());
    });
    upstream.on("open", () => { for (const d of early.splice(0)) upstream.send(d); });
    upstream.on("message", (d) => {
      keep(conn, "g2c", d);
      if (client.readyState === WebSocket.OPEN) client.send(d.toString());
    });
    const end = () => { client.close(); upstream.close(); };
    for (const s of [client, upstream]) { s.on("close", end); s.on("error", end); }
  });
  return {
    url: `ws://127.0.0.1:${server.address().port}`,
    frames,
    cut(conn) { for (const s of pairs.get(conn) || []) s.terminate(); },
    async close() {
      for (const [a, b] of pairs.values()) { a.terminate(); b.terminate(); }
      await new Promise((r) => server.close(() => r()));
    },
  };
}

module.exports = { startRecorder };
