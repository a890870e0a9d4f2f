#!/usr/bin/env node
// The web side of tests/web.rs's randomized mixed-world bus test: a subscriber app (web-sub)
// whose subscriptions twin a native app's, and a publisher app (web-pub).
//
//   node mixed-bus.js --url ws://127.0.0.1:PORT --user NAME --secret TOKEN [--lib io|glue]
//
// Prints {"ready":true} once both are connected and web-sub follows the marker topic
// `mix.mark`, then answers one JSON command per stdin line with one JSON line:
//
//   {"subscribe": K, "topic": T, "options": O}   web-sub subscribes (O: io.Connect's
//                                                routingKey / target), tagging what it gets K
//   {"unsubscribe": K}                           web-sub ends subscription K
//   {"publish": T, "data": D, "options": O}      web-pub publishes
//   {"mark": N, "publish": BOOL}                 (web-pub first publishes {mark: N} on
//                                                mix.mark if asked), then waits until web-sub
//                                                has the marker and answers {"got": [...]}: what
//                                                it received since the previous marker, as
//                                                "K:JSON" (K the subscription, JSON the data), sorted
//   {"done": true}                               leaves and exits 0
// Every other command is answered {"ok": true}.
"use strict";
const { connect, until, serve, fail } = require("./lib/mixed");

(async () => {
  const sub = await connect("web-sub");
  const pub = await connect("web-pub");
  const subs = new Map();
  let got = [];
  let mark = 0;
  await sub.bus.subscribe("mix.mark", (d) => { mark = d.mark; });
  await serve(async (cmd) => {
    if (cmd.mark !== undefined) {
      if (cmd.publish) pub.bus.publish("mix.mark", { mark: cmd.mark });
      await until(() => mark === cmd.mark);
      const out = { got: mark === cmd.mark ? got.sort() : `no marker ${cmd.mark} (last ${mark})` };
      got = [];
      return out;
    }
    if (cmd.subscribe !== undefined) {
      const k = cmd.subscribe;
      subs.set(k, await sub.bus.subscribe(cmd.topic, (d) => got.push(`${k}:${JSON.stringify(d)}`), cmd.options || undefined));
    } else if (cmd.unsubscribe !== undefined) {
      subs.get(cmd.unsubscribe).unsubscribe();
      subs.delete(cmd.unsubscribe);
    } else {
      pub.bus.publish(cmd.publish, cmd.data, cmd.options || undefined);
    }
    return undefined;
  }, async () => { await pub.done(); await sub.done(); });
})().catch(fail);
