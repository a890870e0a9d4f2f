#!/usr/bin/env node
// GW3 gateways with the same published client (@interopio/core) in two processes, against
// knit's bridge and against the reference Glue42 gateway (@glue42/gateway-web, with a large
// per-client buffer so that it does not drop messages), in the same run, alternating rounds.
//
//   node bench.js --knit PATH/TO/knit [--knit-config FILE] [--n 2000] [--rounds 3] [--warmup 5000]
//                 [--only SCENARIO,...] [--deciles]
//
// Scenarios:
//   invoke_rtt           invoke round trip: a server registers Bench.Echo, a caller invokes it;
//   invoke_rtt_raw_gw3   the same with bare GW3 frames (what the gateways themselves cost,
//                        without the library's own time in both processes);
//   ctx_update           context update propagation, one way: a writer updates `bench.ping`
//                        ({i, t, s}: t its clock), a subscriber's callback takes now - t (both
//                        processes read the same monotonic clock) and answers on `bench.pong`;
//                        the writer waits for the answer before the next update (no queueing);
//   ctx_update_raw_gw3   the same with bare GW3 frames (update-context → context-updated);
//   ws_direct            no gateway at all: the raw caller's frames to a Node WebSocket server that
//                        answers each with a result frame — one hop each way instead of two, the
//                        floor a gateway's bare GW3 round trip is measured against (printed as
//                        {gateway: "none"} and, with invoke_rtt_raw_gw3, knit's ratio to it).
//   ws_relay             the same caller and server with `knit __ws-relay` between them: a relay
//                        that only copies frames, spinning (no JSON, no routing, no sleep) — what
//                        the machine charges any relay for the two extra hops. Printed as
//                        {gateway: "relay"}; with invoke_rtt and invoke_rtt_raw_gw3 also the best
//                        ratio any relay could reach in this run (invoke_rtt_ceiling, below).
//   ctx_relay            the same for context propagation: the bare context writer's updates
//                        through `knit __ws-relay` to a Node WebSocket server that plays gateway
//                        and reader at once (sends the writer its `success`, takes now - t,
//                        answers with the ack) — the one-way floor of any relay. Printed as {gateway: "relay"}; with ctx_update and
//                        ctx_update_raw_gw3 also the best context ratio any relay could reach
//                        (ctx_update_ceiling).
// Prints one JSON line per gateway and scenario {gateway, scenario, n, p50_us, p99_us, p999_us,
// mean_us} (with --deciles also deciles_us: the 10th … 90th percentiles), then {scenario, ratio_p50, ratio_p99, ratio_p999, ratio_mean, target} (ratio =
// reference / knit).
"use strict";
const { referenceGateway } = require("./lib/reference");
const { knitGateway: startKnit } = require("./lib/knit");
const { openAsk } = require("./lib/ask");
const { fork, spawn } = require("child_process");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const role = opt("--role");
// Round trips before measuring, in each fresh caller process: V8 optimises the client library in
// both processes over the first few thousand calls (with either gateway, the p50 of calls
// 1000-2000 is 20-25 % above that of calls 4000 and on), so fewer would time the JIT's warm-up
// rather than the gateways.
const WARMUP = Number(opt("--warmup", 5000));
const DECILES = argv.includes("--deciles");

// A child process of this script in `role`; it inherits the warm-up.
const child = (role, args = []) => fork(__filename, ["--role", role, ...args, "--warmup", String(WARMUP)], { stdio: "inherit" });
// The next message from child process `proc` (the `who` of the script's roles), or an error if it
// exits first.
const reply = (proc, who) => new Promise((ok, fail) => { proc.once("message", ok); proc.once("exit", () => fail(new Error(`${who} died`))); });

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

// Times `n` calls (after WARMUP), each expecting a `result`; sends the times to the parent.
async function timeCalls(ws, call, n) {
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

// The same round trip with bare GW3 frames (no client library): what the gateway itself costs.
async function rawLogin(url, application) {
  const ws = await openAsk(url);
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

// A reader process's one-way times: `add(i, t)` takes now - t for update i (t: the writer's
// `process.hrtime`, the same clock), kept after the warm-up; `check()`, once the reader has
// answered the update (so the writer never waits on a reader the parent has killed), answers
// the parent's {collect: n} when n are in.
function oneWayTimes() {
  const us = [];
  let want = null;
  let done = null;
  process.on("message", (m) => {
    if (m.collect) {
      want = m.collect;
      const finish = () => { process.send({ us: us.slice(0, want) }); };
      if (us.length >= want) finish(); else done = finish;
    }
  });
  return {
    add(i, t) { if (i >= WARMUP) us.push(Number(process.hrtime.bigint() - BigInt(t)) / 1000); },
    check() { if (want !== null && us.length >= want && done) done(); },
  };
}

// Context propagation with the library: the subscriber measures, the writer paces.
async function ctxReader(url) {
  const io = await connect(url, "bench-ctx-reader");
  const times = oneWayTimes();
  await io.contexts.subscribe("bench.ping", (data) => {
    if (typeof data.i !== "number" || data.i < 0) return;
    times.add(data.i, data.t);
    io.contexts.update("bench.pong", { i: data.i });
    times.check();
  });
  process.send({ ready: true });
}

async function ctxWriter(url, n) {
  const io = await connect(url, "bench-ctx-writer");
  let wake = null;
  let seen = -1;
  await io.contexts.subscribe("bench.pong", (data) => {
    if (typeof data.i === "number") { seen = data.i; if (wake) wake(); }
  });
  const s = "x".repeat(40);
  for (let i = 0; i < WARMUP + n; i++) {
    const acked = new Promise((r) => { wake = () => { if (seen >= i) r(); }; });
    await io.contexts.update("bench.ping", { i, t: String(process.hrtime.bigint()), s });
    if (seen < i) await acked;
  }
  process.send({ done: true });
  await io.done();
}

// The same with bare GW3 frames.
async function rawCtxReader(url) {
  const ws = await rawLogin(url, "bench-raw-ctx-reader");
  const times = oneWayTimes();
  const made = await ws.ask({ type: "create-context", domain: "global", request_id: "c", peer_id: ws.id,
    name: "bench.raw", data: {}, lifetime: "retained" });
  ws.onOther = (m) => {
    if (m.type !== "context-updated" || !m.delta.reset) return;
    const d = m.delta.reset;
    if (d.i < 0) return;
    times.add(d.i, d.t);
    ws.send(JSON.stringify({ type: "update-context", domain: "global", request_id: `a${d.i}`, peer_id: ws.id,
      context_id: made.context_id, delta: { reset: { ack: d.i } } }));
    times.check();
  };
  process.send({ ready: true });
}

async function rawCtxWriter(url, n) {
  const ws = await rawLogin(url, "bench-raw-ctx-writer");
  const made = await ws.ask({ type: "create-context", domain: "global", request_id: "c", peer_id: ws.id,
    name: "bench.raw", data: {}, lifetime: "retained" });
  let wake = null;
  let seen = -1;
  ws.onOther = (m) => {
    if (m.type === "context-updated" && m.delta.reset && typeof m.delta.reset.ack === "number") {
      seen = m.delta.reset.ack;
      if (wake) wake();
    }
  };
  const s = "x".repeat(40);
  for (let i = 0; i < WARMUP + n; i++) {
    const acked = new Promise((r) => { wake = () => { if (seen >= i) r(); }; });
    ws.send(JSON.stringify({ type: "update-context", domain: "global", request_id: `u${i}`, peer_id: ws.id,
      context_id: made.context_id, delta: { reset: { i, t: String(process.hrtime.bigint()), s } } }));
    if (seen < i) await acked;
  }
  process.send({ done: true });
  ws.close();
}

async function rawCaller(url, n, server) {
  const ws = await rawLogin(url, "bench-raw-caller");
  const args = { s: "x".repeat(40) };
  let k = 0;
  const call = () => ws.ask({ type: "call", domain: "agm", request_id: `c${k++}`, peer_id: ws.id, server_id: server, method_id: "0", arguments_kv: args });
  await timeCalls(ws, call, n);
}

// No gateway: a WebSocket server that answers each call frame with a result frame.
async function directServer() {
  const { WebSocketServer } = require("ws");
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((ok) => wss.once("listening", ok));
  wss.on("connection", (ws) => ws.on("message", (d) => {
    const m = JSON.parse(d.toString());
    ws.send(JSON.stringify({ type: "result", domain: "agm", request_id: m.request_id, peer_id: m.peer_id, result: m.arguments_kv }));
  }));
  process.send({ ready: true, url: `ws://127.0.0.1:${wss.address().port}` });
}

async function directCaller(url, n) {
  const ws = await openAsk(url);
  const args = { s: "x".repeat(40) };
  let k = 0;
  const call = () => ws.ask({ type: "call", domain: "agm", request_id: `c${k++}`, peer_id: "p", server_id: "s", method_id: "0", arguments_kv: args });
  await timeCalls(ws, call, n);
}

// The bare context writer's peer when there is no gateway: answers its login and
// create-context, and for each update sends the writer the `success` a gateway sends it, takes
// the update's one-way time (as rawCtxReader does) and answers with the ack the writer paces
// itself on.
async function directCtxReader() {
  const { WebSocketServer } = require("ws");
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((ok) => wss.once("listening", ok));
  const times = oneWayTimes();
  wss.on("connection", (ws) => ws.on("message", (d) => {
    const m = JSON.parse(d.toString());
    const answer = (a) => ws.send(JSON.stringify({ domain: m.domain, request_id: m.request_id, peer_id: "p-1", ...a }));
    if (m.type === "hello") answer({ type: "welcome" });
    else if (m.type === "join") answer({ type: "success" });
    else if (m.type === "create-context") answer({ type: "context-added", context_id: "c-1", name: m.name });
    else if (m.type === "update-context" && m.delta.reset && m.delta.reset.t) {
      answer({ type: "success" });
      const r = m.delta.reset;
      times.add(r.i, r.t);
      ws.send(JSON.stringify({ type: "context-updated", domain: "global", peer_id: "p-1", context_id: m.context_id,
        updater_id: "p-2", delta: { reset: { ack: r.i } } }));
      times.check();
    }
  }));
  process.send({ ready: true, url: `ws://127.0.0.1:${wss.address().port}` });
}

// `knit __ws-relay` from `bin` in front of the WebSocket server at `upstream`; resolves with
// the relay and its URL.
async function startRelay(bin, upstream) {
  const relay = spawn(bin, ["__ws-relay", "--upstream", upstream.replace("ws://", "")], { stdio: ["ignore", "pipe", "inherit"] });
  const url = await new Promise((ok, fail) => {
    let out = "";
    relay.stdout.on("data", (d) => { out += d; if (out.includes("\n")) ok(out.trim()); });
    relay.once("exit", (code) => fail(new Error(`knit __ws-relay exited (${code})`)));
  });
  return { relay, url };
}

// The bare context writer through the do-nothing relay to directCtxReader: one-way times.
async function measureCtxFloor(n, relayBin) {
  const rd = child("direct-ctx-reader");
  const ready = await reply(rd, "reader");
  const { relay, url } = await startRelay(relayBin, ready.url);
  const wr = child("raw-ctx-writer", ["--url", url, "--n", String(n)]);
  await reply(wr, "writer");
  rd.send({ collect: n });
  const { us } = await reply(rd, "reader");
  rd.kill();
  relay.kill();
  await new Promise((r) => wr.once("exit", r));
  return us;
}

// The direct caller against the direct server: connected to it (`relayBin` absent), or through
// `knit __ws-relay` (the do-nothing relay) started from `relayBin`.
async function measureFloor(n, relayBin) {
  const srv = child("direct-server");
  const ready = await reply(srv, "server");
  let url = ready.url;
  let relay = null;
  if (relayBin) ({ relay, url } = await startRelay(relayBin, ready.url));
  const cli = child("direct-caller", ["--url", url, "--n", String(n)]);
  const { us } = await reply(cli, "caller");
  srv.kill();
  if (relay) relay.kill();
  await new Promise((r) => cli.once("exit", r));
  return us;
}

// knit's gateway for a round (with `--knit-config FILE` if given).
const knitGateway = (bin) => { const config = opt("--knit-config"); return startKnit(bin, config ? ["--config", config] : []); };

// For scripts/bridge-hop.sh and tracing by hand: a knit gateway (`--knit reference`: the
// reference, in this process) and the library server and caller of `invoke_rtt` (with
// `--scenario ctx`: the reader and writer of `ctx_update`), running until SIGTERM; prints the
// gateway's, the server's (reader's) and the caller's (writer's) pids once they have started.
async function drive(bin) {
  const g = bin === "reference" ? { ...(await referenceGateway()), pid: process.pid } : await knitGateway(bin);
  const ctx = opt("--scenario", "invoke") === "ctx";
  const srv = child(ctx ? "ctx-reader" : "server", ["--url", g.url]);
  await reply(srv, "server");
  const cli = child(ctx ? "ctx-writer" : "caller", ["--url", g.url, "--n", String(Number.MAX_SAFE_INTEGER)]);
  process.on("SIGTERM", async () => { cli.kill(); srv.kill(); await g.close(); process.exit(0); });
  console.log(g.pid, srv.pid, cli.pid);
}

// One way, context propagation: the reader measures; the writer paces itself on the answers.
async function measureCtx(url, n, raw) {
  const rd = child(raw ? "raw-ctx-reader" : "ctx-reader", ["--url", url]);
  await reply(rd, "reader");
  const wr = child(raw ? "raw-ctx-writer" : "ctx-writer", ["--url", url, "--n", String(n)]);
  await reply(wr, "writer");
  rd.send({ collect: n });
  const { us } = await reply(rd, "reader");
  rd.kill();
  await new Promise((r) => wr.once("exit", r));
  return us;
}

async function measure(url, n, raw) {
  const srv = child(raw ? "raw-server" : "server", ["--url", url]);
  const ready = await reply(srv, "server");
  const cli = child(raw ? "raw-caller" : "caller", ["--url", url, "--n", String(n), "--server", String(ready.id)]);
  const { us } = await reply(cli, "caller");
  srv.kill();
  await new Promise((r) => cli.once("exit", r));
  return us;
}

function stats(gateway, scenario, xs) {
  xs.sort((a, b) => a - b);
  const q = (p) => xs[Math.min(xs.length - 1, Math.floor(p * xs.length))];
  const r = (v) => Math.round(v * 10) / 10;
  const out = { gateway, scenario, n: xs.length, p50_us: r(q(0.5)), p99_us: r(q(0.99)), p999_us: r(q(0.999)),
    mean_us: r(xs.reduce((a, b) => a + b, 0) / xs.length) };
  // `--deciles`: the shape of the distribution, not only its middle and tail.
  if (DECILES) out.deciles_us = [1, 2, 3, 4, 5, 6, 7, 8, 9].map((d) => r(q(d / 10)));
  return out;
}

async function main() {
  const n = Number(opt("--n", 2000));
  const rounds = Number(opt("--rounds", 3));
  const bin = opt("--knit");
  if (!bin) throw new Error("--knit PATH is required");
  const all = {
    invoke_rtt: (url, k) => measure(url, k, false),
    invoke_rtt_raw_gw3: (url, k) => measure(url, k, true),
    ctx_update: (url, k) => measureCtx(url, k, false),
    ctx_update_raw_gw3: (url, k) => measureCtx(url, k, true),
    ws_direct: null,
    ws_relay: null,
    ctx_relay: null,
  };
  const floors = ["ws_direct", "ws_relay", "ctx_relay"];
  const only = opt("--only");
  const scenarios = only ? only.split(",") : Object.keys(all);
  for (const s of scenarios) if (!(s in all)) throw new Error(`unknown scenario ${s}`);
  const direct = scenarios.includes("ws_direct");
  const relay = scenarios.includes("ws_relay");
  const ctxRelay = scenarios.includes("ctx_relay");
  const samples = {};
  // A fresh pair of gateways per round (a context scenario leaves its contexts behind).
  for (let i = 0; i < rounds; i++) {
    const gateways = { knit: await knitGateway(bin), reference: await referenceGateway() };
    try {
      if (direct) samples.ws_direct = (samples.ws_direct || []).concat(await measureFloor(Math.ceil(n / rounds)));
      if (relay) samples.ws_relay = (samples.ws_relay || []).concat(await measureFloor(Math.ceil(n / rounds), bin));
      if (ctxRelay) samples.ctx_relay = (samples.ctx_relay || []).concat(await measureCtxFloor(Math.ceil(n / rounds), bin));
      for (const scenario of scenarios.filter((s) => !floors.includes(s))) {
        for (const name of Object.keys(gateways)) {
          const key = `${scenario}/${name}`;
          samples[key] = (samples[key] || []).concat(await all[scenario](gateways[name].url, Math.ceil(n / rounds)));
        }
      }
    } finally {
      for (const g of Object.values(gateways)) await g.close();
    }
  }
  const ratio = (a, b) => Math.round((a / b) * 100) / 100;
  // The statistics of every series, once: `scenario/gateway`, or the floors by name.
  const st = {};
  for (const [key, xs] of Object.entries(samples)) {
    const [scenario, gateway] = key.includes("/") ? key.split("/") : [key, key === "ws_direct" ? "none" : "relay"];
    st[key] = stats(gateway, scenario, xs);
  }
  const knitRaw = st["invoke_rtt_raw_gw3/knit"];
  if (direct) {
    const f = st.ws_direct;
    console.log(JSON.stringify(f));
    if (knitRaw) {
      console.log(JSON.stringify({ scenario: "invoke_rtt_raw_gw3_vs_ws_direct", knit_over_floor_p50: ratio(knitRaw.p50_us, f.p50_us),
        knit_over_floor_mean: ratio(knitRaw.mean_us, f.mean_us) }));
    }
  }
  if (relay) {
    const f = st.ws_relay;
    console.log(JSON.stringify(f));
    const lib = st["invoke_rtt/knit"];
    const ref = st["invoke_rtt/reference"];
    if (knitRaw && lib && ref) {
      // The library's own share of a round trip, as knit's run shows it (library minus bare); a
      // relay that cost no more than the ideal one would take relay + library, so no relay can
      // beat the reference by more than reference / (relay + library) in this run.
      const [k, l, r] = [knitRaw, lib, ref].map((x) => x.p50_us);
      console.log(JSON.stringify({ scenario: "invoke_rtt_ceiling", relay_p50_us: f.p50_us, knit_raw_p50_us: k,
        knit_raw_over_relay_p50: ratio(k, f.p50_us), library_p50_us: Math.round((l - k) * 10) / 10,
        reference_p50_us: r, best_ratio_p50: ratio(r, f.p50_us + (l - k)), knit_ratio_p50: ratio(r, l) }));
    }
  }
  if (ctxRelay) {
    const f = st.ctx_relay;
    console.log(JSON.stringify(f));
    const [raw, lib, ref] = [st["ctx_update_raw_gw3/knit"], st["ctx_update/knit"], st["ctx_update/reference"]];
    if (raw && lib && ref) {
      // As for invoke: the library's share of one update's way (library minus bare, knit's run),
      // and the best ratio a relay costing no more than the ideal one could reach in this run.
      const [k, l, r] = [raw, lib, ref].map((x) => x.p50_us);
      console.log(JSON.stringify({ scenario: "ctx_update_ceiling", relay_p50_us: f.p50_us, knit_raw_p50_us: k,
        knit_raw_over_relay_p50: ratio(k, f.p50_us), library_p50_us: Math.round((l - k) * 10) / 10,
        reference_p50_us: r, best_ratio_p50: ratio(r, f.p50_us + (l - k)), knit_ratio_p50: ratio(r, l) }));
    }
  }
  for (const scenario of scenarios.filter((s) => !floors.includes(s))) {
    const k = st[`${scenario}/knit`];
    const r = st[`${scenario}/reference`];
    console.log(JSON.stringify(k));
    console.log(JSON.stringify(r));
    console.log(JSON.stringify({ scenario, ratio_p50: ratio(r.p50_us, k.p50_us), ratio_p99: ratio(r.p99_us, k.p99_us),
      ratio_p999: ratio(r.p999_us, k.p999_us), ratio_mean: ratio(r.mean_us, k.mean_us), target: 3 }));
  }
  process.exit(0);
}

if (role === "server") server(opt("--url")).catch((e) => { console.error(e); process.exit(1); });
else if (role === "raw-server") rawServer(opt("--url")).catch((e) => { console.error(e); process.exit(1); });
else if (role === "raw-caller") rawCaller(opt("--url"), Number(opt("--n")), opt("--server")).catch((e) => { console.error(e); process.exit(1); });
else if (role === "direct-server") directServer().catch((e) => { console.error(e); process.exit(1); });
else if (role === "direct-ctx-reader") directCtxReader().catch((e) => { console.error(e); process.exit(1); });
else if (role === "direct-caller") directCaller(opt("--url"), Number(opt("--n"))).catch((e) => { console.error(e); process.exit(1); });
else if (role === "caller") caller(opt("--url"), Number(opt("--n"))).catch((e) => { console.error(e); process.exit(1); });
else if (role === "ctx-reader") ctxReader(opt("--url")).catch((e) => { console.error(e); process.exit(1); });
else if (role === "ctx-writer") ctxWriter(opt("--url"), Number(opt("--n"))).catch((e) => { console.error(e); process.exit(1); });
else if (role === "raw-ctx-reader") rawCtxReader(opt("--url")).catch((e) => { console.error(e); process.exit(1); });
else if (role === "raw-ctx-writer") rawCtxWriter(opt("--url"), Number(opt("--n"))).catch((e) => { console.error(e); process.exit(1); });
else if (role === "drive") drive(opt("--knit")).catch((e) => { console.error(e); process.exit(1); });
else main().catch((e) => { console.error(e); process.exit(1); });
