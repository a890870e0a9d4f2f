#!/usr/bin/env node
// A web app built on the published client library, in a world shared with native knit apps.
// Driven by tests/web.rs, which runs the native side:
//
//   node mixed.js --url ws://127.0.0.1:PORT --user NAME --secret TOKEN [--lib io|glue]
//
// It registers Web.Upper and Web.Fail, calls the native Native.Sum and Native.Fail, and prints
// one JSON line per observation on stdout, then {"ready":true}. It leaves (done()) when a line
// "done" arrives on stdin, and exits 0, or 1 on any unexpected failure.
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
  say({ ready: true });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() === "done") break;
  }
  await io.done();
  process.exit(0);
})().catch((e) => { say({ error: String(e && e.stack || e) }); process.exit(1); });
