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
const { connect, until, serve, fail } = require("./lib/mixed");

(async () => {
  const apps = { "web-a": await connect("web-a"), "web-b": await connect("web-b") };
  const serving = { "web-a": new Set(), "web-b": new Set() };
  const caller = apps["web-a"];
  // (The libraries list a method once per distinct definition, each with all its servers.)
  const seen = (m) => [...new Set(caller.interop.methods().filter((d) => d.name === m)
    .flatMap((d) => d.getServers().map((s) => s.application)))].sort();
  await serve(async (cmd) => {
    if (cmd.toggle) {
      const app = cmd.toggle, m = cmd.method;
      if (serving[app].has(m)) {
        await apps[app].interop.unregister(m);
        serving[app].delete(m);
      } else {
        await apps[app].interop.register(m, () => ({ by: app }));
        serving[app].add(m);
      }
      return { registered: serving[app].has(m) };
    }
    if (cmd.await) {
      const want = JSON.stringify(cmd.servers);
      await until(() => JSON.stringify(seen(cmd.await)) === want);
      return { seen: seen(cmd.await) };
    }
    const r = await caller.interop.invoke(cmd.invoke, {}, cmd.target, { waitTimeoutMs: 0 });
    const all = r.all_return_values || [];
    return { executors: all.map((x) => x.executed_by.application).sort(), returned: all.map((x) => x.returned.by).sort() };
  }, async () => { for (const a of Object.values(apps)) await a.done(); });
})().catch(fail);
