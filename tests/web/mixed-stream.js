#!/usr/bin/env node
// The web side of tests/web.rs's randomized mixed-world stream test: a web app serving the
// stream Mix.S.web (web-srv) and a web app (web-sub) whose subscriptions twin a native app's,
// to that stream and to the native Mix.S.native.
//
//   node mixed-stream.js --url ws://127.0.0.1:PORT --user NAME --secret TOKEN [--lib io|glue]
//
// Both servers answer a subscription request by its arguments {mode, k}: "all" accepts, "b1"
// and "b2" accept on that branch, "rej" rejects. Prints {"ready":true} once both streams are
// visible, then answers one JSON command per stdin line with one JSON line:
//
//   {"subscribe": K, "server": "native"|"web", "mode": M}   web-sub subscribes with {mode: M, k: K}
//   {"close": K}                    web-sub ends subscription K
//   {"push": DATA, "branch": B}     web-srv pushes (to branch B, or to all when B is null)
//   {"closeBranch": B}              web-srv closes branch B
//   {"drop": K}                     web-srv closes the subscription whose k is K
//   {"mark": N, "push": BOOL, "keys": [K...]}
//        (web-srv first pushes {mark: N} to all if asked), then waits until each subscription K
//        has that marker or has ended, and answers {"got": {K: [EVENT...]}}: what each received
//        since the previous marker ("data JSON", "private JSON", "closed")
//   {"done": true}                  leaves and exits 0
// The others are answered {"ok": true} (or {"error": MESSAGE}).
"use strict";
const { connect, until, serve, fail } = require("./lib/mixed");

(async () => {
  const srv = await connect("web-srv");
  const sub = await connect("web-sub");
  const stream = await srv.interop.createStream("Mix.S.web", {
    subscriptionRequestHandler: (req) => {
      const m = req.arguments.mode;
      if (m === "rej") req.reject("no");
      else if (m === "b1" || m === "b2") req.acceptOnBranch(m);
      else req.accept();
    },
  });
  await sub.interop.waitForMethod("Mix.S.web");
  await sub.interop.waitForMethod("Mix.S.native");
  const subs = new Map(); // K -> {sub, events, mark, ended}
  await serve(async (cmd) => {
    if (cmd.mark !== undefined) {
      if (cmd.push) stream.push({ mark: cmd.mark });
      await until(() => cmd.keys.every((k) => { const t = subs.get(k); return !t || t.ended || t.mark === cmd.mark; }));
      const got = {};
      for (const k of cmd.keys) {
        const t = subs.get(k);
        got[k] = t ? t.events.splice(0) : ["gone"];
        if (t && t.mark !== cmd.mark && !t.ended) got[k].push(`no marker ${cmd.mark}`);
        if (t && t.ended) subs.delete(k);
      }
      return { got };
    }
    if (cmd.subscribe !== undefined) {
      const k = cmd.subscribe;
      const name = cmd.server === "native" ? "Mix.S.native" : "Mix.S.web";
      const s = await sub.interop.subscribe(name, { arguments: { mode: cmd.mode, k }, waitTimeoutMs: 0 });
      const t = { sub: s, events: [], mark: 0, ended: false };
      s.onData((d) => {
        if (d.data && d.data.mark !== undefined) t.mark = d.data.mark;
        else t.events.push(`${d.private ? "private" : "data"} ${JSON.stringify(d.data)}`);
      });
      s.onClosed(() => { t.ended = true; t.events.push("closed"); });
      subs.set(k, t);
    } else if (cmd.close !== undefined) {
      subs.get(cmd.close).sub.close();
      subs.delete(cmd.close);
    } else if (cmd.push !== undefined) {
      stream.push(cmd.push, cmd.branch || undefined);
    } else if (cmd.closeBranch !== undefined) {
      const b = stream.branches(cmd.closeBranch);
      if (b) b.close();
    } else if (cmd.drop !== undefined) {
      for (const s of stream.subscriptions()) if (s.arguments.k === cmd.drop) s.close();
    }
    return undefined;
  }, async () => { await sub.done(); await srv.done(); });
})().catch(fail);
