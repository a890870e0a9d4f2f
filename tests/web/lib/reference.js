// The reference gateway (the real Glue42 gateway, @glue42/gateway-web from npm) in this
// process, behind a WebSocket server of our own on 127.0.0.1, with a client buffer large
// enough that it drops nothing. Used by the benchmark and the differential runs.
"use strict";

async function referenceGateway() {
  const { WebSocketServer } = require("ws");
  const gwlib = require("@glue42/gateway-web/node/gateway-web.js");
  gwlib.configure_logging({ level: "error", appender: (e) => process.stderr.write(e.output + "\n") });
  const gw = gwlib.create({ clients: { inactive_seconds: 0, buffer_size: 1000000 } });
  await gw.start();
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((ok) => wss.once("listening", ok));
  wss.on("connection", (socket) => {
    const early = [];
    let client = null;
    const deliver = (text) => {
      let msg;
      try { msg = JSON.parse(text); } catch { return; }
      if (msg && typeof msg === "object" && !Array.isArray(msg)) client.send(msg);
    };
    gw.connect((_c, msg) => { if (socket.readyState === socket.OPEN) socket.send(JSON.stringify(msg)); })
      .then((c) => { client = c; early.splice(0).forEach(deliver); });
    socket.on("message", (d) => (client ? deliver(d.toString()) : early.push(d.toString())));
    // The reference gateway sometimes throws while tearing down a peer whose process was just
    // killed; that must not end the run.
    socket.on("close", () => { try { if (client) client.disconnect(); } catch (e) { process.stderr.write(`reference disconnect: ${e.message}\n`); } });
  });
  return { url: `ws://127.0.0.1:${wss.address().port}`, close: async () => { wss.close(); await gw.stop(); } };
}

module.exports = { referenceGateway };
