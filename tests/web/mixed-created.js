#!/usr/bin/env node
// The web side of tests/web.rs's test of contexts that native writes create: an app subscribes
// to contexts that do not exist yet, which native apps then create by writing them.
//
//   node mixed-created.js --url ws://127.0.0.1:PORT --user NAME --secret TOKEN --prefix P --n N [--lib io|glue]
//
// Subscribes to P0 … P(N-1), prints {"ready":true}, then answers {"first": true} with
// {"first": {NAME: DATA, …}}: the data of each context's first callback, once every one of them
// has had a callback whose data is not empty (so an empty first callback is reported, not
// waited past).
"use strict";
const { opt, connect, until, serve, fail } = require("./lib/mixed");

const prefix = opt("--prefix");
const n = Number(opt("--n"));

(async () => {
  const app = await connect("web-waiter");
  const seen = new Map();
  for (let i = 0; i < n; i++) {
    const name = `${prefix}${i}`;
    await app.contexts.subscribe(name, (data) => {
      const all = seen.get(name) || [];
      all.push(data);
      seen.set(name, all);
    });
  }
  const full = (d) => d && Object.keys(d).length > 0;
  await serve(async (cmd) => {
    if (!cmd.first) throw new Error(`unknown command ${JSON.stringify(cmd)}`);
    await until(() => seen.size === n && [...seen.values()].every((all) => all.some(full)));
    const first = {};
    for (const [name, all] of seen) first[name] = all[0];
    return { first };
  }, () => app.done());
})().catch(fail);
