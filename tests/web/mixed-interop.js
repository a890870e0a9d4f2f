#!/usr/bin/env node
// The web side of tests/web.rs's randomized mixed-world interop test: two web apps (web-a,
// web-b) that serve methods next to native apps; web-a also calls them.
//
//   node mixed-interop.js --url ws://127.0.0.1:PORT --user NAME --secret TOKEN [--lib io|glue]
//
// Prints {"ready":true}, then answers one JSON command per stdin line with one JSON line:
//
//   {"toggle": APP, "method": M}       APP (web-a or web-b) registers M, or unregisters it if it
//                                      serves it; answers {"registered": BOOL}
//   {"await": M, "servers": [APP...]}  waits until web-a sees exactly these applications serve M
//                                      (sorted); answers {"seen": [APP...]} (what it saw last)
//   {"invoke": M, "target": T}         web-a invokes M on T (io.Connect's target forms) without
//                                      waiting for servers; answers {"executors": [APP...],
//                                      "returned": [BY...]} (sorted) or {"error": MESSAGE}
//   {"done": true}                     leaves and exits 0
// Every method a web app serves returns {"by": its application}.
"use strict";
const readline = require("readline");
const { library } = require("./scenarios");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const connect = (application) => library(opt("--lib", "io"))({
  application,
  gateway: { ws: opt("--url") },
  auth: { username: opt("--user"), password: opt("--secret") },
  logger: "error",
});

(async () => {
  const apps = { "web-a": await connect("web-a"), "web-b": await connect("web-b") };
  const serving = { "web-a": new Set(), "web-b": new Set() };
  const caller = apps["web-a"];
  // (The libraries list a method once per distinct definition, each with all its servers.)
  const seen = (m) => [...new Set(caller.interop.methods().filter((d) => d.name === m)
    .flatMap((d) => d.getServers().map((s) => s.application)))].sort();
  say({ ready: true });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const cmd = JSON.parse(line);
    if (cmd.done) break;
    if (cmd.toggle) {
      const app = cmd.toggle, m = cmd.method;
      if (serving[app].has(m)) {
        await apps[app].interop.unregister(m);
        serving[app].delete(m);
      } else {
        await apps[app].interop.register(m, () => ({ by: app }));
        serving[app].add(m);
      }
      say({ registered: serving[app].has(m) });
    } else if (cmd.await) {
      const want = JSON.stringify(cmd.servers);
      const end = Date.now() + 10000;
      while (JSON.stringify(seen(cmd.await)) !== want && Date.now() < end) await new Promise((r) => setImmediate(r));
      say({ seen: seen(cmd.await) });
    } else if (cmd.invoke) {
      try {
        const r = await caller.interop.invoke(cmd.invoke, {}, cmd.target, { waitTimeoutMs: 0 });
        const all = r.all_return_values || [];
        say({ executors: all.map((x) => x.executed_by.application).sort(), returned: all.map((x) => x.returned.by).sort() });
      } catch (e) {
        say({ error: (e && (e.message || e.reason)) || String(e) });
      }
    }
  }
  for (const a of Object.values(apps)) await a.done();
  process.exit(0);
})().catch((e) => { say({ failed: String(e && e.stack || e) }); process.exit(1); });
