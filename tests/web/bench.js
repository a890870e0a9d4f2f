#!/usr/bin/env node
// Invoke round trip through a GW3 gateway with the same published client (@interopio/core) in
// two processes — a server that registers Bench.Echo and a caller — against knit's bridge and
// against the reference Glue42 gateway (@glue42/gateway-web, with a large per-client buffer so
// that it does not drop messages), in the same run, alternating rounds.
//
//   node bench.js --knit PATH/TO/knit [--n 2000] [--rounds 3] [--warmup 1000]
//
// Two scenarios: `invoke_rtt` with the client library, and `invoke_rtt_raw_gw3` with bare GW3
// frames (what the gateways themselves cost, without the library's own time in both processes).
// Prints one JSON line per gateway and scenario {gateway, scenario, n, p50_us, p99_us, p999_us,
// mean_us}, then {scenario, ratio_p50, ratio_mean, target} (ratio = reference / knit).
"use strict";
const { fork, spawn } = require("child_process");
const fs = require("fs");
const os = require("os");
const path = require("path");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const role = opt("--role");
// Round trips before measuring, in each fresh caller process (lets V8 optimise both ends).
const WARMUP = Number(opt("--warmup", 1000));

function connect(url, application) {
  const m = require("@interopio/core");
  return (m.default || m)({ application, gateway: { ws: url }, auth: { username: "bench", password: "bench" }, logger: "error" });
}

async function server(url) {
  const io = await connect(url, "bench-server");
  await io.interop.register("Bench.Echo", (args) => args);
  process.send({ ready: true });
}

async function caller(url, n) {
  const io = await connect(url, "bench-caller");
  await io.interop.waitForMethod("Bench.Echo");
  const payload = { s: "x".repeat(40) }; // about 64 bytes of JSON
  for (let i = 0; i < WARMUP; i++) await io.interop.invoke("Bench.Echo", payload);
  const us = [];
  for (let i = 0; i < n; i++) {
    const t = process.hrtime.bigint();
    const r = await io.interop.invoke("Bench.Echo", payload);
    us.push(Number(process.hrtime.bigint() - t) / 1000);
    if (r.returned.s !== payload.s) throw new Error("wrong answer");
  }
  process.send({ us });
  await io.done();
}

// The same round trip with bare GW3 frames (no client library): what the gateway itself costs.
async function rawLogin(url, application) {
  const WebSocket = require("ws");
  const ws = new WebSocket(url);
  await new Promise((ok, fail) => { ws.once("open", ok); ws.once("error", fail); });
  const waiters = new Map();
  ws.on("message", (d) => {
    const m = JSON.parse(d.toString());
    const w = m.request_id != null && waiters.get(m.request_id);
    if (w) { waiters.delete(m.request_id); w(m); } else if (ws.onInvoke && m.type === "invoke") ws.onInvoke(m);
  });
  ws.ask = (m) => new Promise((ok) => { waiters.set(m.request_id, ok); ws.send(JSON.stringify(m)); });
  const w = await ws.ask({ type: "hello", request_id: "h", identity: { application }, authentication: { method: "secret", login: "bench", secret: "bench" } });
  ws.id = w.peer_id;
  await ws.ask({ type: "join", domain: "global", destination: "agm", request_id: "j", peer_id: ws.id });
  return ws;
}

async function rawServer(url) {
  const ws = await rawLogin(url, "bench-raw-server");
  ws.onInvoke = (m) => ws.send(JSON.stringify({ type: "yield", domain: "agm", peer_id: ws.id, request_id: "y",
    invocation_id: m.invocation_id, result: m.arguments_kv }));
  await ws.ask({ type: "register", domain: "agm", request_id: "r", peer_id: ws.id, methods: [{ id: "0", name: "Bench.RawEcho" }] });
  process.send({ ready: true, id: ws.id });
}

async function rawCaller(url, n, server) {
  const ws = await rawLogin(url, "bench-raw-caller");
  const args = { s: "x".repeat(40) };
  let k = 0;
  const call = () => ws.ask({ type: "call", domain: "agm", request_id: `c${k++}`, peer_id: ws.id, server_id: server, method_id: "0", arguments_kv: args });
  for (let i = 0; i < WARMUP; i++) await call();
  const us = [];
  for (let i = 0; i < n; i++) {
    const t = process.hrtime.bigint();
    const r = await call();
    us.push(Number(process.hrtime.bigint() - t) / 1000);
    if (r.type !== "result") throw new Error(JSON.stringify(r));
  }
  process.send({ us });
  ws.close();
}

// The reference gateway, in this process, on a WebSocket server of our own on 127.0.0.1.
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
    socket.on("close", () => client && client.disconnect());
  });
  return { url: `ws://127.0.0.1:${wss.address().port}`, close: async () => { wss.close(); await gw.stop(); } };
}

async function knitGateway(bin) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "knit-bench-"));
  const child = spawn(bin, ["gateway", "--gateway", path.join(dir, "gw.sock"), "--ws", "127.0.0.1:0", "--ws-auth", "open"],
    { stdio: ["ignore", "ignore", "pipe"] });
  const url = await new Promise((ok, fail) => {
    let err = "";
    child.stderr.on("data", (d) => {
      err += d;
      const m = /bridge listening on (ws:\/\/[0-9.:]+)\//.exec(err);
      if (m) ok(m[1]);
    });
    child.on("exit", (code) => fail(new Error(`knit gateway exited (${code}): ${err}`)));
  });
  return { url, close: async () => { child.kill("SIGTERM"); fs.rmSync(dir, { recursive: true, force: true }); } };
}

async function measure(url, n, raw) {
  const srv = fork(__filename, ["--role", raw ? "raw-server" : "server", "--url", url], { stdio: "inherit" });
  const ready = await new Promise((ok, fail) => { srv.once("message", ok); srv.once("exit", () => fail(new Error("server died"))); });
  const cli = fork(__filename, ["--role", raw ? "raw-caller" : "caller", "--url", url, "--n", String(n), "--server", String(ready.id)],
    { stdio: "inherit" });
  const { us } = await new Promise((ok, fail) => { cli.once("message", ok); cli.once("exit", () => fail(new Error("caller died"))); });
  srv.kill();
  await new Promise((r) => cli.once("exit", r));
  return us;
}

function stats(gateway, scenario, xs) {
  xs.sort((a, b) => a - b);
  const q = (p) => xs[Math.min(xs.length - 1, Math.floor(p * xs.length))];
  const r = (v) => Math.round(v * 10) / 10;
  return { gateway, scenario, n: xs.length, p50_us: r(q(0.5)), p99_us: r(q(0.99)), p999_us: r(q(0.999)),
    mean_us: r(xs.reduce((a, b) => a + b, 0) / xs.length) };
}

async function main() {
  const n = Number(opt("--n", 2000));
  const rounds = Number(opt("--rounds", 3));
  const bin = opt("--knit");
  if (!bin) throw new Error("--knit PATH is required");
  const gateways = { knit: await knitGateway(bin), reference: await referenceGateway() };
  const scenarios = { invoke_rtt: false, invoke_rtt_raw_gw3: true };
  const samples = {};
  try {
    for (let i = 0; i < rounds; i++) {
      for (const [scenario, raw] of Object.entries(scenarios)) {
        for (const name of Object.keys(gateways)) {
          const key = `${scenario}/${name}`;
          samples[key] = (samples[key] || []).concat(await measure(gateways[name].url, Math.ceil(n / rounds), raw));
        }
      }
    }
  } finally {
    for (const g of Object.values(gateways)) await g.close();
  }
  for (const scenario of Object.keys(scenarios)) {
    const k = stats("knit", scenario, samples[`${scenario}/knit`]);
    const r = stats("reference", scenario, samples[`${scenario}/reference`]);
    console.log(JSON.stringify(k));
    console.log(JSON.stringify(r));
    console.log(JSON.stringify({ scenario, ratio_p50: Math.round((r.p50_us / k.p50_us) * 100) / 100,
      ratio_mean: Math.round((r.mean_us / k.mean_us) * 100) / 100, target: 3 }));
  }
  process.exit(0);
}

if (role === "server") server(opt("--url")).catch((e) => { console.error(e); process.exit(1); });
else if (role === "raw-server") rawServer(opt("--url")).catch((e) => { console.error(e); process.exit(1); });
else if (role === "raw-caller") rawCaller(opt("--url"), Number(opt("--n")), opt("--server")).catch((e) => { console.error(e); process.exit(1); });
else if (role === "caller") caller(opt("--url"), Number(opt("--n"))).catch((e) => { console.error(e); process.exit(1); });
else main().catch((e) => { console.error(e); process.exit(1); });
