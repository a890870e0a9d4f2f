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
const { opt, connect, until, serve, fail } = require("./lib/mixed");

const name = opt("--name");

(async () => {
  const writer = await connect("web-writer");
  const reader = await connect("web-reader");
  let last = null;
  await reader.contexts.subscribe(name, (data, delta, removed) => { last = { data, delta, removed }; });
  await serve(async (cmd) => {
    if (cmd.view !== undefined) {
      await until(() => last && last.data && last.data.seq === cmd.view);
      const out = { ...(last || {}) };
      if (cmd.joiner) {
        const app = await connect("web-joiner");
        out.joined = await app.contexts.get(name);
        await app.done();
      }
      return out;
    }
    if (cmd.update) await writer.contexts.update(name, cmd.update);
    else if (cmd.set) await writer.contexts.set(name, cmd.set);
    else await writer.contexts.setPaths(name, cmd.paths);
    return undefined;
  }, async () => { await writer.done(); await reader.done(); });
})().catch(fail);
