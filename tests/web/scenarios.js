// The GW3 scenarios knit is compared on, driven through the published client libraries
// (@interopio/core 6.x, or @glue42/core 5.x with lib "glue") and through raw GW3 peers for what
// the libraries never send. Each performs the same client operations, in the same order, as the
// run that recorded the golden transcript of the same name (tests/fixtures/gw3/), so the frames
// can be compared one by one.
"use strict";
const WebSocket = require("ws");

const pause = (ms) => new Promise((r) => setTimeout(r, ms));
const STEP_MS = Number(process.env.KNIT_STEP_MS || 200);

// Resolves once `cond()` holds, looking every `step` ms; rejects after `ms` with `what`.
async function waitFor(cond, what, ms = 5000, step = 10) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await pause(step);
  }
}

function library(lib) {
  const m = require(lib === "glue" ? "@glue42/core" : "@interopio/core");
  return m.default || m;
}

function client(url, label, { lib = "io", user = "harness", auth } = {}) {
  return library(lib)({
    application: `harness-${label}`,
    gateway: { ws: url },
    auth: auth || { username: user, password: "secret" },
    bus: true,
    logger: "error",
  });
}

// A raw GW3 peer: JSON frames in and out, an inbox to pick answers from.
async function raw(url) {
  const ws = new WebSocket(url);
  await new Promise((ok, fail) => { ws.once("open", ok); ws.once("error", fail); });
  const inbox = [];
  const wake = new Set();
  ws.on("message", (d) => {
    const text = d.toString();
    let m;
    try { m = JSON.parse(text); } catch { m = { type: "<text>", text }; }
    inbox.push(m);
    for (const w of wake) w();
  });
  const peer = {
    id: null,
    send: (m) => ws.send(typeof m === "string" ? m : JSON.stringify(m)),
    // The next message matching `pred`, or null after `ms`.
    next(pred = () => true, ms = 1000) {
      return new Promise((resolve) => {
        const look = () => {
          const i = inbox.findIndex(pred);
          if (i < 0) return false;
          wake.delete(look);
          clearTimeout(timer);
          resolve(inbox.splice(i, 1)[0]);
          return true;
        };
        const timer = setTimeout(() => { wake.delete(look); resolve(null); }, ms);
        if (!look()) wake.add(look);
      });
    },
    ask(m, ms) {
      peer.send(m);
      return peer.next((x) => x.request_id === m.request_id, ms);
    },
    close: () => ws.close(),
  };
  return peer;
}

const app = (instance) => instance && instance.application;
const scenarios = {};

scenarios.handshake = async ({ url, log, lib }) => {
  const A = await client(url, "A", { lib });
  log("A.peerId", A.connection.peerId);
  const B = await client(url, "B", { lib });
  await waitFor(() => A.interop.servers().length === 2, "A to see B");
  log("A sees", A.interop.servers().map(app));
  log("B sees", B.interop.servers().map(app));
  await B.done();
  await waitFor(() => A.interop.servers().length === 1, "A to see B go");
  await A.done();
};

scenarios.auth = async ({ url, log }) => {
  const hello = (request_id, authentication, identity = { application: "raw-" + request_id }) =>
    ({ type: "hello", domain: "global", request_id, identity, authentication });
  const a = await raw(url);
  const wa = await a.ask(hello("h1", { method: "secret", login: "alice", secret: "pw" }));
  log("secret", wa.type);
  const b = await raw(url);
  log("access-token", (await b.ask(hello("h2", { method: "access-token", token: wa.options.access_token }))).type);
  const tok = await a.ask({ type: "create-token", domain: "global", request_id: "t1", peer_id: wa.peer_id });
  const c = await raw(url);
  log("gateway-token", (await c.ask(hello("h3", { method: "gateway-token", token: tok.token }))).type);
  const refused = async (label, authentication, identity) => {
    const p = await raw(url);
    const r = await p.ask(hello("bad", authentication, identity));
    log(label, r && r.reason);
    p.close();
  };
  await refused("bad access token", { method: "access-token", token: "not-a-jwt" });
  await refused("unknown method", { method: "kerberos" });
  await refused("no secret", { method: "secret", login: "alice" });
  await refused("no authentication", undefined);
  await refused("unknown provider", { provider: "nope", method: "secret", login: "a", secret: "b" });
  const fixed = { application: "raw-dup", instance: "dup-1" };
  const d = await raw(url);
  log("explicit instance", (await d.ask(hello("d1", { method: "secret", login: "alice", secret: "x" }, fixed))).type);
  await refused("same identity again", { method: "secret", login: "alice", secret: "x" }, fixed);
  const on = (m) => a.ask({ domain: "global", peer_id: wa.peer_id, ...m });
  log("join nosuch", (await on({ type: "join", request_id: "j1", destination: "nosuch" })).reason_uri);
  log("unknown global type", (await on({ type: "frobnicate", request_id: "u1" })).reason_uri);
  log("join agm", (await on({ type: "join", request_id: "j2", destination: "agm" })).domain);
  log("join agm again", (await on({ type: "join", request_id: "j3", destination: "agm" })).domain);
  log("unknown agm type", (await a.ask({ type: "frobnicate", domain: "agm", request_id: "u2", peer_id: wa.peer_id })).reason_uri);
  log("leave agm", (await on({ type: "leave", request_id: "l1", destination: "agm" })).domain);
  a.send({ type: "ping" });
  log("ping answered?", !!(await a.next(() => true, 300)));
  const e = await raw(url);
  log("before hello", (await e.ask({ type: "join", domain: "global", request_id: "j0", peer_id: "p-nobody", destination: "agm" })).reason_uri);
  for (const p of [a, b, c, d, e]) p.close();
  await pause(STEP_MS);
};

scenarios.invoke = async ({ url, log, lib }) => {
  const A = await client(url, "A", { lib });
  const B = await client(url, "B", { lib });
  await A.interop.register("Harness.Echo", (args, caller) => ({ server: "A", args, caller: app(caller) }));
  await A.interop.register({ name: "Harness.OnlyA", accepts: "Int x", returns: "Int y", description: "only on A", flags: { kind: "test" } },
    (args) => ({ y: args.x * 10 }));
  await A.interop.register("Harness.Fail", () => { throw new Error("deliberate failure in A"); });
  await A.interop.register("Harness.Reject", () => Promise.reject({ code: 42 }));
  await A.interop.register("Harness.Scalar", () => 42);
  await B.interop.register("Harness.Echo", (args, caller) => ({ server: "B", args, caller: app(caller) }));
  await waitFor(() => new Set(B.interop.methods().map((m) => m.name).filter((n) => n.startsWith("Harness."))).size === 5, "B to see A's methods");
  await waitFor(() => A.interop.servers({ name: "Harness.Echo" }).length === 2, "A to see B's Echo");
  const run = async (label, ...args) => {
    try {
      const r = await B.interop.invoke(...args);
      log(label, { by: app(r.executed_by), returned: r.returned, all: (r.all_return_values || []).length });
    } catch (e) {
      log(label + " (rejected)", { message: e.message, returned: e.returned });
    }
    await pause(STEP_MS);
  };
  await run("best, both serve", "Harness.Echo", { n: 1 });
  await run("best, A serves", "Harness.OnlyA", { x: 2 }, "best");
  await run("all", "Harness.Echo", { n: 3 }, "all");
  await run("instance filter", "Harness.Echo", { n: 4 }, { application: "harness-A" });
  await run("skipMine", "Harness.Echo", { n: 5 }, "skipMine");
  await run("throws", "Harness.Fail", { n: 6 });
  await run("rejects with an object", "Harness.Reject", { n: 7 });
  await run("returns 42", "Harness.Scalar", {});
  await A.interop.unregister("Harness.OnlyA");
  await waitFor(() => B.interop.methods("Harness.OnlyA").length === 0, "B to see OnlyA go");
  await B.done();
  await A.done();
};

// Streams: a server with a subscription handler (accept, accept on a branch, reject), pushes to
// every branch, to one branch and to one subscription, a subscriber closing, the stream closing.
scenarios.stream = async ({ url, log, lib }) => {
  const A = await client(url, "A", { lib });
  const B = await client(url, "B", { lib });
  const ticks = await A.interop.createStream("Harness.Ticks", {
    subscriptionRequestHandler: (req) => {
      log("A asked", req.arguments);
      if (req.arguments.reject) req.reject("not allowed");
      else if (req.arguments.branch) req.acceptOnBranch(req.arguments.branch);
      else req.accept();
    },
    subscriptionAddedHandler: (sub) => log("A added", { args: sub.arguments, branch: sub.branchKey }),
    subscriptionRemovedHandler: (sub) => log("A removed", sub.arguments),
  });
  await waitFor(() => B.interop.methods("Harness.Ticks").length === 1, "B to see the stream");
  const watch = (label) => ({
    onData: (d) => log(`B ${label} data`, { data: d.data, private: d.private, server: app(d.server) }),
    onClosed: (c) => log(`B ${label} closed`, c.message),
  });
  const first = await B.interop.subscribe("Harness.Ticks", { arguments: { symbol: "X" }, ...watch("first") });
  await B.interop.subscribe("Harness.Ticks", { arguments: { branch: "b1" }, ...watch("on b1") });
  await pause(STEP_MS);
  ticks.push({ tick: 1 });
  await pause(STEP_MS);
  ticks.push({ tick: 2 }, "b1");
  await pause(STEP_MS);
  ticks.subscriptions().find((s) => s.arguments.symbol === "X").push({ only: "s1" });
  await pause(STEP_MS);
  try {
    await B.interop.subscribe("Harness.Ticks", { arguments: { reject: true } });
    log("rejected?", false);
  } catch (e) {
    log("rejected", e.message);
  }
  first.close();
  await pause(STEP_MS);
  await ticks.close();
  await waitFor(() => B.interop.methods("Harness.Ticks").length === 0, "B to see the stream go");
  await B.done();
  await A.done();
};

// Shared contexts: B subscribes before the context exists; A creates it with update, then
// update, a null that removes, set, setPath, setPaths; B updates; get, all, unsubscribe, destroy.
scenarios.contexts = async ({ url, log, lib }) => {
  const A = await client(url, "A", { lib });
  const B = await client(url, "B", { lib });
  const name = "harness.ctx";
  const stop = await B.contexts.subscribe(name, (data, delta, removed) => log("B sees", { data, delta, removed }));
  const step = async (label, change) => {
    await change();
    await pause(STEP_MS);
    log(label, await A.contexts.get(name));
  };
  await step("A creates it with update", () => A.contexts.update(name, { a: 1, b: { c: 2 } }));
  await step("A updates", () => A.contexts.update(name, { b: { d: 3 }, e: "x" }));
  await step("A removes a with null", () => A.contexts.update(name, { a: null }));
  await step("A sets", () => A.contexts.set(name, { x: { y: 1 } }));
  await step("A sets a path", () => A.contexts.setPath(name, "x.z", 5));
  await step("A sets paths", () => A.contexts.setPaths(name, [{ path: "p.q", value: 1 }, { path: "x.y", value: null }]));
  await step("B updates", () => B.contexts.update(name, { fromB: true }));
  log("B gets", await B.contexts.get(name));
  log("B knows", B.contexts.all().filter((n) => n.startsWith("harness")));
  stop();
  await pause(STEP_MS);
  await step("A updates after B left", () => A.contexts.update(name, { afterUnsub: 1 }));
  await A.contexts.destroy(name);
  await pause(STEP_MS);
  log("after destroy", [A, B].map((c) => c.contexts.all().filter((n) => n.startsWith("harness"))));
  await B.done();
  await A.done();
};

// The bus: B subscribes to a topic, with a routing key, with a wildcard and with a source
// filter; A subscribes too (and so gets its own messages); A publishes plain, with routing
// keys, to a target identity and to another topic; B drops one subscription.
scenarios.bus = async ({ url, log, lib }) => {
  const A = await client(url, "A", { lib });
  const B = await client(url, "B", { lib });
  const got = (label) => (data, topic, source) => log(`${label} got`, { data, topic, from: app(source) });
  const plain = await B.bus.subscribe("harness.topic", got("B plain"));
  await B.bus.subscribe("harness.topic", got("B rk1"), { routingKey: "rk1" });
  await B.bus.subscribe("harness.*", got("B wildcard"));
  await B.bus.subscribe("harness.topic", got("B from A"), { target: { application: "harness-A" } });
  await A.bus.subscribe("harness.topic", got("A plain"));
  const publish = async (...args) => {
    A.bus.publish(...args);
    await pause(STEP_MS);
  };
  await publish("harness.topic", { n: 1 });
  await publish("harness.topic", { n: 2 }, { routingKey: "rk1" });
  await publish("harness.topic", { n: 3 }, { routingKey: "rk2" });
  await publish("harness.topic", { n: 4 }, { target: { application: "harness-B" } });
  await publish("harness.other", { n: 5 });
  await plain.unsubscribe();
  await pause(STEP_MS);
  await publish("harness.topic", { n: 6 });
  await B.done();
  await A.done();
};

// B's connection is cut (by the recording relay); the library reconnects as a new peer and
// re-announces its method, stream subscription, context and bus subscription.
scenarios.reconnect = async ({ url, log, lib, cut }) => {
  const A = await client(url, "A", { lib });
  const B = await client(url, "B", { lib });
  const feed = await A.interop.createStream("Harness.Feed");
  await B.interop.register("Harness.OnB", () => ({ ok: true }));
  await waitFor(() => B.interop.methods("Harness.Feed").length === 1, "B to see Feed");
  await B.interop.subscribe("Harness.Feed", { onData: (d) => log("B feed", d.data) });
  await B.contexts.update("harness.rc", { v: 1 });
  await B.bus.subscribe("harness.rc.topic", (d) => log("B bus", d));
  await waitFor(() => A.interop.methods("Harness.OnB").length === 1, "A to see OnB");
  A.interop.serverRemoved((s) => log("A lost", app(s)));
  await pause(STEP_MS);
  const before = B.connection.peerId;
  cut("B");
  await waitFor(() => B.connection.isConnected && B.connection.peerId !== before, "B to come back", 10000);
  await waitFor(() => A.interop.methods("Harness.OnB").length === 1 && feed.subscriptions().length === 1,
    "B to re-announce itself", 10000);
  await pause(STEP_MS);
  log("B is a new peer", B.connection.peerId !== before);
  feed.push({ after: "reconnect" });
  A.bus.publish("harness.rc.topic", { after: "reconnect" });
  await pause(STEP_MS);
  log("A gets", await A.contexts.get("harness.rc"));
  if (lib === "glue") {
    // @glue42/core 5.13's done() after a reconnect does not wait for its leaves, so the two
    // apps leave at the same time; the reference run happened to see A go first. Make it so.
    await A.done();
    await pause(STEP_MS);
    await B.done();
  } else {
    await B.done();
    await A.done();
  }
};

// Gateway semantics the libraries never exercise, as raw GW3 from X and Y (user u1), Z (u2),
// then W, S, C and P (u1): isolation, call errors and a call pending when its server goes;
// context deltas, unknown ids, lifetimes; the bus wildcard `>` and self-delivery; a stream's
// life (sequence/snapshot passed through, unregistered while subscribed, server gone); the
// envelope.
scenarios.edges = async ({ url, log }) => {
  let n = 0;
  const next = () => `e${++n}`;
  const login = async (user, application) => {
    const p = await raw(url);
    const w = await p.ask({ type: "hello", domain: "global", request_id: next(), identity: { application },
      authentication: { method: "secret", login: user, secret: "x" } });
    for (const destination of ["agm", "bus"]) {
      await p.ask({ type: "join", domain: "global", request_id: next(), peer_id: w.peer_id, destination });
    }
    p.id = w.peer_id;
    p.req = (m) => p.ask({ peer_id: w.peer_id, request_id: next(), ...m });
    return p;
  };
  const X = await login("u1", "raw-X");
  const Y = await login("u1", "raw-Y");
  const Z = await login("u2", "raw-Z");
  log("Z sees X or Y?", !!(await Z.next((m) => m.type === "peer-added", 300)));
  await X.req({ type: "register", domain: "agm", methods: [{ id: 7, name: "Edge.M", flags: {} }] });
  log("Y sees Edge.M", !!(await Y.next((m) => m.type === "methods-added" && m.server_id === X.id)));
  log("Z sees Edge.M?", !!(await Z.next((m) => m.type === "methods-added", 300)));
  log("unknown method id", (await Y.req({ type: "call", domain: "agm", server_id: X.id, method_id: 99, arguments_kv: {} })).reason);
  log("both argument kinds", (await Y.req({ type: "call", domain: "agm", server_id: X.id, method_id: 7, arguments: [1], arguments_kv: { a: 1 } })).reason);
  log("across users", (await Z.req({ type: "call", domain: "agm", server_id: X.id, method_id: 7, arguments_kv: {} })).reason);
  Y.send({ type: "call", domain: "agm", request_id: "pending-call", peer_id: Y.id, server_id: X.id, method_id: 7, arguments_kv: { a: 1 } });
  log("X invoked", !!(await X.next((m) => m.type === "invoke")));
  X.close();
  log("pending call", (await Y.next((m) => m.request_id === "pending-call")).reason);
  await Promise.all([Y.next((m) => m.type === "methods-removed"), Y.next((m) => m.type === "peer-removed")]);

  // Contexts, in the global domain as the libraries send them.
  const yctx = (m) => Y.req({ domain: "global", ...m });
  const made = await yctx({ type: "create-context", name: "edge.ctx", data: { a: { b: 1, c: 2 }, l: [1, 2] }, lifetime: "retained" });
  const W = await login("u1", "raw-W");
  log("W told at login", (await W.next((m) => m.type === "context-added")).name);
  log("W joins by name", (await W.req({ type: "create-context", domain: "global", name: "edge.ctx", data: { ignored: true }, lifetime: "retained" })).data);
  for (const delta of [
    { updated: { a: { d: 3 } } },
    { added: { n: 1 }, removed: ["l"] },
    { reset: { r: 1 }, added: { s: 2 } },
    { added: { t: 3 }, reset: { r: 2 } },
    { commands: [{ type: "set", path: "x.y.z", value: 1 }, { type: "remove", path: "r" }] },
  ]) {
    await yctx({ type: "update-context", context_id: made.context_id, delta });
    const seen = await W.next((m) => m.type === "context-updated");
    log("verbatim", JSON.stringify(seen.delta) === JSON.stringify(delta));
    log("now", (await W.req({ type: "subscribe-context", domain: "global", context_id: made.context_id })).data);
  }
  log("update unknown", (await yctx({ type: "update-context", context_id: "c-nope", delta: { added: { a: 1 } } })).reason);
  log("subscribe unknown", (await yctx({ type: "subscribe-context", context_id: "c-nope" })).reason);
  log("bad lifetime", (await yctx({ type: "create-context", name: "edge.bad", data: {}, lifetime: "forever" })).reason_uri);
  log("Z sees edge.ctx?", !!(await Z.next((m) => m.type === "context-added", 300)));
  const zc = await Z.req({ type: "create-context", domain: "global", name: "edge.ctx", data: { z: 1 }, lifetime: "retained" });
  log("Z's own edge.ctx", zc.type);
  const rc = await yctx({ type: "create-context", name: "edge.rc", data: {}, lifetime: "ref-counted" });
  await W.req({ type: "subscribe-context", domain: "global", context_id: rc.context_id });
  await yctx({ type: "unsubscribe-context", context_id: rc.context_id });
  log("ref-counted, a member left", !!(await W.next((m) => m.type === "context-destroyed", 300)));
  await W.req({ type: "unsubscribe-context", domain: "global", context_id: rc.context_id });
  log("ref-counted, the last member left", (await Y.next((m) => m.type === "context-destroyed" && m.context_id === rc.context_id)).reason_uri);
  const own = await W.req({ type: "create-context", domain: "global", name: "edge.own", data: {}, lifetime: "ownership" });
  log("not the owner", (await yctx({ type: "destroy-context", context_id: own.context_id })).reason_uri);
  W.close();
  log("the owner left", (await Y.next((m) => m.type === "context-destroyed" && m.context_id === own.context_id)).reason_uri);

  // The bus.
  log("subscribe edge.>", (await Y.req({ type: "subscribe", domain: "bus", topic: "edge.>" })).type);
  Z.send({ type: "publish", domain: "bus", request_id: next(), peer_id: Z.id, topic: "edge.a.b", data: { from: "Z" } });
  log("another user's message?", !!(await Y.next((m) => m.type === "event", 300)));
  Y.send({ type: "publish", domain: "bus", request_id: next(), peer_id: Y.id, topic: "edge.a.b", data: { from: "Y" } });
  log("its own message", (await Y.next((m) => m.domain === "bus", 500)).data);

  // A stream's life: S serves, C subscribes.
  const S = await login("u1", "raw-S");
  const C = await login("u1", "raw-C");
  const subscribe = async (methodId, label) => {
    C.send({ type: "subscribe", domain: "agm", request_id: label, peer_id: C.id, server_id: S.id, method_id: methodId, arguments_kv: {} });
    const interest = await S.next((m) => m.type === "add-interest");
    S.send({ type: "accepted", domain: "agm", request_id: next(), peer_id: S.id, subscription_id: interest.subscription_id, stream_id: `s${methodId}` });
    return C.next((m) => m.request_id === label);
  };
  await S.req({ type: "register", domain: "agm", methods: [{ id: 1, name: "Edge.S1", flags: { streaming: true } }] });
  await C.next((m) => m.type === "methods-added" && m.server_id === S.id);
  log("subscribed", (await subscribe(1, "sub1")).type);
  S.send({ type: "publish", domain: "agm", request_id: next(), peer_id: S.id, stream_id: "s1", data: { a: 1 }, sequence: 5, snapshot: true });
  log("event", (await C.next((m) => m.type === "event")).sequence);
  log("S unregisters", (await S.req({ type: "unregister", domain: "agm", methods: [1] })).type);
  log("C hears", [(await C.next((m) => m.type === "subscription-cancelled")).reason_uri,
    (await C.next((m) => m.type === "methods-removed")).type]);
  log("S told?", !!(await S.next((m) => m.type === "remove-interest", 300)));
  await S.req({ type: "register", domain: "agm", methods: [{ id: 2, name: "Edge.S2", flags: { streaming: true } }] });
  await C.next((m) => m.type === "methods-added" && m.server_id === S.id);
  await subscribe(2, "sub2");
  S.close();
  log("S gone", [(await C.next((m) => m.type === "subscription-cancelled")).reason_uri,
    (await C.next((m) => m.type === "peer-removed")).reason_uri]);

  // The envelope.
  const P = await raw(url);
  P.send({ type: "hello", identity: { application: "raw-P" }, authentication: { method: "secret", login: "u1", secret: "x" } });
  const wp = await P.next((m) => m.type === "welcome");
  log("welcome.request_id", wp.request_id);
  log("join without domain", (await P.ask({ type: "join", request_id: "nd", peer_id: wp.peer_id, destination: "bus" })).domain);
  log("unknown domain", (await P.ask({ type: "x", domain: "nosuch", request_id: "ud", peer_id: wp.peer_id })).domain);
  P.send("42");
  log("non-object frame", (await P.next((m) => m.type === "<text>", 500) || {}).text);
  // The remaining peers are not closed one by one: which of them the gateway sees go first is
  // timing (and shows as peer-removed frames or not); the recorder ends them all at once.
  await pause(STEP_MS);
};

module.exports = { scenarios, client, raw, waitFor, pause, library };
