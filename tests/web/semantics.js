#!/usr/bin/env node
// Behaviours of the reference gateway that apps written against the published client libraries
// rely on, checked one at a time against knit's bridge. Driven by tests/web.rs:
//
//   node semantics.js --url ws://127.0.0.1:PORT --lib io|glue --check NAME
//
// Prints what it saw and exits 0 when the check holds, 1 otherwise. The checks:
//
//   array-arguments  a web caller's array arguments reach a web method (and a web stream's
//                    subscription request) as the array they are, as the reference forwards them
//   bus-unsubscribe-twice  a bus subscription unsubscribed twice (the libraries send both) is
//                    no error: @glue42/core would leave one unhandled
//   bus-empty-topic  a bus subscription to the empty topic is accepted and gets what is
//                    published on it, as on the reference
//   callee-gone-order  a server that leaves with a call waiting: the caller's library reports the
//                    server removed before the invocation fails, every time (the reference
//                    gateway's frames for both come in one write, so its clients always see
//                    this order)
"use strict";
const { client, raw, waitFor } = require("./scenarios");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const url = opt("--url");
const lib = opt("--lib", "io");
const check = opt("--check");

const failures = [];
const expect = (ok, what) => { if (!ok) failures.push(what); };
// Any rejection nobody handles is a failure: it would end a Node app (and warn in a browser).
process.on("unhandledRejection", (e) => failures.push(`unhandled rejection: ${JSON.stringify(e && (e.message || e))}`));

const checks = {
  async "array-arguments"() {
    const A = await client(url, "A", { lib });
    const C = await client(url, "C", { lib });
    await A.interop.register("Args.Echo", (args) => ({ got: args }));
    const requests = [];
    await A.interop.createStream("Args.Stream", { subscriptionRequestHandler: (r) => { requests.push(r.arguments); r.accept(); } });
    await C.interop.waitForMethod("Args.Echo");
    await C.interop.waitForMethod("Args.Stream");
    for (const args of [[1, 2], [], [{ a: 1 }, "s"], { k: [1] }]) {
      const r = await C.interop.invoke("Args.Echo", args);
      expect(JSON.stringify(r.returned.got) === JSON.stringify(args), `invoke with ${JSON.stringify(args)}: the method got ${JSON.stringify(r.returned.got)}`);
    }
    const sub = await C.interop.subscribe("Args.Stream", { arguments: [3, 4] });
    expect(JSON.stringify(requests) === "[[3,4]]", `subscribe with [3,4]: the server got ${JSON.stringify(requests)}`);
    sub.close();
    await A.done();
    await C.done();
  },
  async "bus-unsubscribe-twice"() {
    const A = await client(url, "A", { lib });
    const got = [];
    const sub = await A.bus.subscribe("twice.topic", (d) => got.push(d));
    sub.unsubscribe();
    sub.unsubscribe();
    // Answered in order: once this subscription is confirmed, both unsubscribes were answered
    // (and a rejection of either reported).
    const later = await A.bus.subscribe("twice.later", () => {});
    A.bus.publish("twice.topic", { n: 1 });
    A.bus.publish("twice.later", { n: 2 });
    const after = await A.bus.subscribe("twice.after", () => {});
    expect(got.length === 0, `unsubscribed, yet got ${JSON.stringify(got)}`);
    later.unsubscribe();
    after.unsubscribe();
    await A.done();
  },

  async "callee-gone-order"() {
    const B = await client(url, "B", { lib });
    const rounds = 20;
    const orders = {};
    for (let r = 0; r < rounds; r++) {
      const application = `gone-${r}`;
      const K = await raw(url);
      const w = await K.ask({ type: "hello", domain: "global", request_id: "h", identity: { application },
        authentication: { method: "secret", login: "harness", secret: "secret" } });
      await K.ask({ type: "join", domain: "global", destination: "agm", request_id: "j", peer_id: w.peer_id });
      await K.ask({ type: "register", domain: "agm", request_id: "r", peer_id: w.peer_id, methods: [{ id: "1", name: "Gone.M" }] });
      await waitFor(() => B.interop.methods("Gone.M").length === 1, "B to see the method");
      const order = [];
      const off = B.interop.serverRemoved((s) => s && s.application === application && order.push("serverRemoved"));
      const call = B.interop.invoke("Gone.M", {}).then(() => order.push("returned"), () => order.push("rejected"));
      expect(await K.next((m) => m.type === "invoke", 5000), `round ${r}: the call never reached the server`);
      K.close();
      await call;
      await waitFor(() => order.length === 2, "the removal and the failure");
      if (typeof off === "function") off();
      orders[order.join(" then ")] = (orders[order.join(" then ")] || 0) + 1;
      await waitFor(() => B.interop.methods("Gone.M").length === 0, "the method to go");
    }
    expect(orders["serverRemoved then rejected"] === rounds, `orders over ${rounds} rounds: ${JSON.stringify(orders)}`);
    await B.done();
  },

  async "bus-empty-topic"() {
    const A = await client(url, "A", { lib });
    const B = await client(url, "B", { lib });
    const got = [];
    let marked = false;
    await B.bus.subscribe("", (d) => got.push(d));
    await B.bus.subscribe("empty.mark", () => { marked = true; });
    A.bus.publish("", { n: 1 });
    // Behind the message, from the same publisher: once it is in, so is the message.
    A.bus.publish("empty.mark", {});
    const end = Date.now() + 10000;
    while (!marked && Date.now() < end) await new Promise((r) => setTimeout(r, 5));
    expect(marked, "the marker published after the message never came");
    expect(JSON.stringify(got) === JSON.stringify([{ n: 1 }]), `the empty topic's subscription got ${JSON.stringify(got)}`);
    await A.done();
    await B.done();
  },
};

(async () => {
  const run = checks[check];
  if (!run) throw new Error(`unknown check ${check}`);
  await run();
  for (const f of failures) console.log(`FAILED: ${f}`);
  console.log(failures.length ? `${check} (${lib}): ${failures.length} failures` : `${check} (${lib}): ok`);
  process.exit(failures.length ? 1 : 0);
})().catch((e) => {
  console.log(`${check} (${lib}): error ${e && (e.stack || e.message || e)}`);
  process.exit(1);
});
