#!/usr/bin/env node
// A web app built on the published client library, in a world shared with native knit apps.
// Driven by tests/web.rs, which runs the native side:
//
//   node mixed.js --url ws://127.0.0.1:PORT --user NAME --secret TOKEN [--lib io|glue]
//
// It registers Web.Upper and Web.Fail and calls the native Native.Sum and Native.Fail; follows
// the context `mixed.ctx` (written natively) and its own `web.ctx`; subscribes to the bus topic
// `mixed.topic`; serves the stream Web.Ticks. It prints one JSON line per observation on stdout
// ({"ready":true} once set up), and acts on one command per stdin line:
//
//   ctx update|set JSON      write web.ctx            ctx setPath PATH JSON
//   publish                  publish {n:1} on web.topic
//   subscribe-native-stream  subscribe to Native.Ticks (prints "subscribed" once accepted)
//   push                     push {w:1} on Web.Ticks
//   done                     leave (done()) and exit 0 (1 on any unexpected failure)
"use strict";
const readline = require("readline");
const { library } = require("./scenarios");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

(async () => {
  const io = await library(opt("--lib", "io"))({
    application: "web-mixed",
    gateway: { ws: opt("--url") },
    auth: { username: opt("--user"), password: opt("--secret") },
    bus: true,
    logger: "error",
  });
  say({ step: "connected", user: io.connection.resolvedIdentity.user, peerId: io.connection.peerId });
  await io.interop.register("Web.Upper", (args, caller) => ({ upper: String(args.s).toUpperCase(), caller: caller.application }));
  await io.interop.register("Web.Fail", () => { throw new Error("web says no"); });
  await io.interop.waitForMethod("Native.Sum");
  const native = io.interop.servers().find((s) => s.application === "rust-native");
  say({ step: "native-server", server: native && { application: native.application, pid: native.pid, isLocal: native.isLocal } });
  const sum = await io.interop.invoke("Native.Sum", { a: 40, b: 2 });
  say({ step: "sum", returned: sum.returned, executed_by: sum.executed_by.application });
  try {
    await io.interop.invoke("Native.Fail", {});
    say({ step: "fail", error: null });
  } catch (e) {
    say({ step: "fail", error: e.message, returned: e.returned });
  }

  // Contexts: what a subscriber callback gets (removed is undefined for a reset: shown as []).
  const watch = (step) => (data, delta, removed) => say({ step, data, delta, removed: removed || [] });
  await io.contexts.subscribe("mixed.ctx", watch("ctx"));
  await io.contexts.subscribe("web.ctx", watch("own-ctx"));
  await io.bus.subscribe("mixed.topic", (data, topic, source) => say({ step: "bus", data, topic, from: source && source.application }));
  const ticks = await io.interop.createStream("Web.Ticks");
  say({ ready: true });

  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [cmd, ...rest] = line.trim().split(" ");
    if (cmd === "done") break;
    if (cmd === "ctx") {
      const [op, ...more] = rest;
      if (op === "setPath") await io.contexts.setPath("web.ctx", more[0], JSON.parse(more.slice(1).join(" ")));
      else await io.contexts[op]("web.ctx", JSON.parse(more.join(" ")));
      say({ step: "written", op });
    } else if (cmd === "publish") {
      io.bus.publish("web.topic", { n: 1 });
      say({ step: "published" });
    } else if (cmd === "subscribe-native-stream") {
      await io.interop.subscribe("Native.Ticks", {
        onData: (d) => say({ step: "stream", data: d.data, private: d.private, server: d.server && d.server.application }),
        onClosed: (c) => say({ step: "stream-closed", message: c.message }),
      });
      say({ step: "subscribed" });
    } else if (cmd === "push") {
      ticks.push({ w: 1 });
      say({ step: "pushed" });
    } else {
      throw new Error(`unknown command ${line}`);
    }
  }
  await io.done();
  process.exit(0);
})().catch((e) => { say({ error: String(e && e.stack || e) }); process.exit(1); });
