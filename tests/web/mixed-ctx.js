#!/usr/bin/env node
// The web side of tests/web.rs's randomized mixed-world context test: a writer app and a
// subscriber app on one context that native knit apps write too.
//
//   node mixed-ctx.js --url ws://127.0.0.1:PORT --user NAME --secret TOKEN --name CTX [--lib io|glue]
//
// Prints {"ready":true} once subscribed, then acts on one JSON command per stdin line and answers
// each with one JSON line:
//
//   {"update": DATA} | {"set": DATA} | {"paths": [{path, value}, ...]}
//        the writer writes; answers {"ok":true} (or {"error": MESSAGE})
//   {"view": SEQ, "joiner": BOOL}
//        waits until the subscriber has seen data with seq SEQ, then answers
//        {"data", "delta", "removed"} as its callback got them, and with "joiner" what an app
//        that connects now reads ({"joined": DATA})
//   {"done": true}
//        leaves and exits 0
"use strict";
const readline = require("readline");
const { library } = require("./scenarios");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const name = opt("--name");
const connect = (application) => library(opt("--lib", "io"))({
  application,
  gateway: { ws: opt("--url") },
  auth: { username: opt("--user"), password: opt("--secret") },
  logger: "error",
});

(async () => {
  const writer = await connect("web-writer");
  const reader = await connect("web-reader");
  let last = null;
  await reader.contexts.subscribe(name, (data, delta, removed) => { last = { data, delta, removed }; });
  say({ ready: true });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const cmd = JSON.parse(line);
    if (cmd.done) break;
    if (cmd.view !== undefined) {
      const end = Date.now() + 10000;
      while (!(last && last.data && last.data.seq === cmd.view) && Date.now() < end) await new Promise((r) => setImmediate(r));
      const out = { ...(last || {}) };
      if (cmd.joiner) {
        const app = await connect("web-joiner");
        out.joined = await app.contexts.get(name);
        await app.done();
      }
      say(out);
      continue;
    }
    try {
      if (cmd.update) await writer.contexts.update(name, cmd.update);
      else if (cmd.set) await writer.contexts.set(name, cmd.set);
      else await writer.contexts.setPaths(name, cmd.paths);
      say({ ok: true });
    } catch (e) {
      say({ error: (e && (e.message || e.reason)) || String(e) });
    }
  }
  await writer.done();
  await reader.done();
  process.exit(0);
})().catch((e) => { say({ failed: String(e && e.stack || e) }); process.exit(1); });
