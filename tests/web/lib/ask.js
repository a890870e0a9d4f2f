"use strict";
// A raw GW3 WebSocket for the bench and load scripts: `ask(m)` sends `m` and resolves with the
// answer carrying its request_id; other frames go to `onInvoke` (invocations) or `onOther`, if
// set, and are dropped otherwise.
const WebSocket = require("ws");

async function openAsk(url) {
  const ws = new WebSocket(url);
  await new Promise((ok, fail) => { ws.once("open", ok); ws.once("error", fail); });
  const waiters = new Map();
  ws.on("message", (d) => {
    const m = JSON.parse(d.toString());
    const w = m.request_id != null && waiters.get(m.request_id);
    if (w) { waiters.delete(m.request_id); w(m); } else if (ws.onInvoke && m.type === "invoke") ws.onInvoke(m);
    else if (ws.onOther) ws.onOther(m);
  });
  ws.ask = (m) => new Promise((ok) => { waiters.set(m.request_id, ok); ws.send(JSON.stringify(m)); });
  return ws;
}

module.exports = { openAsk };
