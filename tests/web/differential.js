#!/usr/bin/env node
// Randomized differential runs: the same seeded sequence of operations by real client-library
// apps (in this process) against knit's bridge and against the reference Glue42 gateway
// (@glue42/gateway-web from npm, started here), and what every app observed compared step by
// step. Driven by tests/web.rs:
//
//   node differential.js --url ws://127.0.0.1:PORT --scenario ctx|interop|bus|streams
//                        [--seeds 1,2] [--ops 120] [--lib io|glue]
//
// Prints the first differences and exits 1 if there are any, 0 otherwise (with SHOW=1 in the
// environment, both logs whole, to investigate one). Scenarios:
//
//   ctx      a writer's update / set / setPaths (nested objects, arrays, nulls, removals) on one
//            context: the subscriber's (data, delta, removed) after each step, and what an app
//            that joins later reads, every 10 steps
//   interop  three apps register and unregister three methods and invoke them with every
//            target form (best, all, skipMine, an application, several, none matching), a
//            throwing handler and a slow one: each invocation's result or error, and each app's
//            view of the methods
//   bus      three apps subscribe (topics with * and >, routing keys, targets), unsubscribe and
//            publish (with routing keys and targets): who received what after each publish
//   streams  a server accepting, rejecting and accepting on branches; two apps subscribing and
//            closing; the server pushing to all, to branches and to one subscription, closing
//            branches and dropping subscriptions: what each subscription received, how it
//            ended, and what the server's handlers were told, after each step
//
// Every step waits on what it caused (a sequence number in the data, the expected method view,
// a marker message behind the step), never on a timer. Operations whose outcome on the
// reference is one of the differences listed in docs/gw3-conformance.md are not generated (a
// removal through a parent that is not an object).
"use strict";
const { referenceGateway } = require("./lib/reference");
const { client } = require("./scenarios");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const knitUrl = opt("--url");
const scenario = opt("--scenario");
const seeds = opt("--seeds", "1").split(",").map(Number);
const OPS = Number(opt("--ops", 120));
const lib = opt("--lib", "io");
const WAIT_MS = 10000;

function rng(seed) {
  let s = seed >>> 0;
  return () => { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; return s / 4294967296; };
}

// Resolves once `cond()` holds; rejects after WAIT_MS (then the step's log says what was missing).
async function until(cond, what) {
  const end = Date.now() + WAIT_MS;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

const sortKeys = (v) => {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v && typeof v === "object") { const o = {}; for (const k of Object.keys(v).sort()) o[k] = sortKeys(v[k]); return o; }
  return v;
};
const j = (v) => JSON.stringify(v === undefined ? null : sortKeys(v));

const scenarios = {
  async ctx(url, r, log) {
    const pick = (a) => a[Math.floor(r() * a.length)];
    const keys = ["a", "b", "c", "d"];
    const val = (depth) => {
      const k = r();
      if (depth > 2 || k < 0.35) return pick([1, 0, -2.5, "s", "", true, false, null]);
      if (k < 0.5) return Array.from({ length: Math.floor(r() * 3) }, () => val(depth + 1));
      const o = {};
      for (let n = Math.floor(r() * 3); n > 0; n--) o[pick(keys)] = val(depth + 1);
      return o;
    };
    const obj = () => { const o = {}; for (let n = 1 + Math.floor(r() * 3); n > 0; n--) o[pick(keys)] = val(1); return o; };
    // A path to set: any; a path to remove: one whose parents are objects in the current data.
    const path = () => Array.from({ length: 1 + Math.floor(r() * 3) }, () => pick(keys)).join(".");
    const removable = (data) => {
      const out = [];
      const walk = (o, pre) => { for (const k of Object.keys(o)) { const p = pre ? `${pre}.${k}` : k; out.push(p); const v = o[k]; if (v && typeof v === "object" && !Array.isArray(v)) walk(v, p); } };
      walk(data, "");
      return out.filter((p) => p !== "seq").concat([pick(keys)]);
    };
    const A = await client(url, "A", { lib });
    const B = await client(url, "B", { lib });
    const name = "diff.ctx";
    let last = null;
    await A.contexts.set(name, { seq: 0 });
    await B.contexts.subscribe(name, (data, delta, removed) => { last = { data, delta, removed }; });
    await until(() => last && last.data.seq === 0, "the first update");
    for (let i = 1; i <= OPS; i++) {
      const op = pick(["update", "update", "update", "set", "paths", "paths"]);
      let arg;
      try {
        if (op === "update") { arg = { ...obj(), seq: i }; await A.contexts.update(name, arg); }
        else if (op === "set") { arg = { ...obj(), seq: i }; await A.contexts.set(name, arg); }
        else {
          // A removal is not generated under a path the same update wrote or removed before (its
          // parent might then be missing or not an object).
          const earlier = [];
          const remove = () => {
            const p = pick(removable(last.data));
            return earlier.some((e) => p.startsWith(`${e}.`)) ? p.split(".")[0] : p;
          };
          arg = Array.from({ length: 1 + Math.floor(r() * 2) }, () => {
            const step = r() < 0.3 ? { path: remove(), value: null } : { path: path(), value: val(1) ?? 0 };
            earlier.push(step.path);
            return step;
          });
          arg.push({ path: "seq", value: i });
          await A.contexts.setPaths(name, arg);
        }
        await until(() => last.data.seq === i, `the subscriber to see step ${i}`);
        log(`#${i} ${op} ${j(arg)} -> ${j(last)}`);
      } catch (e) {
        log(`#${i} ${op} ${j(arg)} -> ${e.message || j(e)}`);
        break;
      }
      if (i % 10 === 0) {
        const C = await client(url, "C", { lib });
        log(`   joiner reads ${j(await C.contexts.get(name))}`);
        await C.done();
      }
    }
    await B.done();
    await A.done();
  },

  async interop(url, r, log) {
    const pick = (a) => a[Math.floor(r() * a.length)];
    const names = ["A", "B", "C"];
    const apps = {};
    for (const n of names) apps[n] = await client(url, n, { lib });
    const app = (n) => `harness-${n}`;
    const regs = { A: new Set(), B: new Set(), C: new Set() };
    const servers = (m) => names.filter((n) => regs[n].has(m)).map(app).join("+");
    const seen = (X, m) => {
      const found = X.interop.methods().filter((d) => d.name === m);
      // (The libraries list a method once per distinct definition, each with all its servers.)
      return [...new Set(found.flatMap((d) => d.getServers().map((s) => s.application)))].sort().join("+");
    };
    const one = (x) => x && { by: x.executed_by && x.executed_by.application, returned: x.returned, message: x.message, status: x.status };
    const byApp = (a, b) => String(a.by).localeCompare(String(b.by));
    const shape = (res) => res && { ...one(res),
      all: (res.all_return_values || []).map(one).sort(byApp), errors: (res.all_errors || []).map(one).sort(byApp) };
    for (let i = 1; i <= OPS; i++) {
      const who = pick(names), X = apps[who];
      const m = pick(["m1", "m2", "m3"]);
      if (r() < 0.25) {
        let line;
        if (regs[who].has(m)) {
          await X.interop.unregister(m);
          regs[who].delete(m);
          line = `${who} unregisters ${m}`;
        } else {
          await X.interop.register(m, (args) => {
            if (m === "m3" && who === "C") throw new Error(`boom from ${who}`);
            if (args && args.slow) return new Promise((ok) => setTimeout(() => ok({ by: who, slow: true }), 5));
            return { by: who, args };
          });
          regs[who].add(m);
          line = `${who} registers ${m}`;
        }
        try {
          await until(() => names.every((n) => seen(apps[n], m) === servers(m)), `every app to see ${m} served by ${servers(m) || "nobody"}`);
          log(`#${i} ${line}`);
        } catch (e) {
          log(`#${i} ${line}: ${e.message} (${names.map((n) => `${n}: ${seen(apps[n], m)}`).join(", ")})`);
          break;
        }
      } else {
        const target = pick([undefined, "best", "all", "skipMine", { application: app(pick(names)) },
          [{ application: app(pick(names)) }, { application: app(pick(names)) }], { application: "nobody" }]);
        const args = pick([{ x: 1 }, {}, { slow: true }, { n: null, a: [1, 2] }]);
        let out;
        try { out = { ok: shape(await X.interop.invoke(m, args, target, { waitTimeoutMs: 0 })) }; }
        catch (e) { out = { error: shape(e) || String(e) }; }
        log(`#${i} ${who} invokes ${m} on ${j(target)} with ${j(args)} -> ${j(out)}`);
      }
    }
    for (const n of names) await apps[n].done();
  },

  async bus(url, r, log) {
    const pick = (a) => a[Math.floor(r() * a.length)];
    const names = ["A", "B", "C"];
    const apps = {}, subs = {}, got = {}, marks = {};
    for (const n of names) {
      apps[n] = await client(url, n, { lib });
      subs[n] = [];
      got[n] = [];
      marks[n] = 0;
      await apps[n].bus.subscribe("diff.mark", (d) => { marks[n] = d.mark; });
    }
    const options = () => pick([undefined, { routingKey: "rk" }, { routingKey: "other" }, { target: { application: `harness-${pick(names)}` } }]);
    // A marker from `who` behind its last message: once everyone has it, the gateway has handled
    // everything `who` sent before (each connection's messages are handled in order).
    const settle = async (who, i) => {
      apps[who].bus.publish("diff.mark", { mark: i });
      await until(() => names.every((n) => marks[n] === i), `every app to get marker ${i}`);
    };
    for (let i = 1; i <= OPS; i++) {
      const who = pick(names), X = apps[who];
      const k = r();
      let line;
      if (k < 0.25) {
        const topic = pick(["t.a", "t.b", "t.*", "t.>", "u", "t.a.b"]);
        const o = options();
        const tag = `${who}:${topic}:${j(o)}`;
        subs[who].push(await X.bus.subscribe(topic, (d, t) => got[who].push(`${tag} <- ${j(d)} on ${t}`), o));
        line = `${who} subscribes ${tag}`;
      } else if (k < 0.35 && subs[who].length) {
        const n = Math.floor(r() * subs[who].length);
        subs[who].splice(n, 1)[0].unsubscribe();
        line = `${who} unsubscribes its subscription ${n}`;
      } else {
        const topic = pick(["t.a", "t.b", "u", "t.a.b", "t.c"]);
        const o = options();
        X.bus.publish(topic, { i }, o);
        line = `${who} publishes on ${topic} with ${j(o)}`;
      }
      try {
        await settle(who, i);
      } catch (e) {
        log(`#${i} ${line}: ${e.message}`);
        break;
      }
      const received = {};
      for (const n of names) { received[n] = got[n].sort(); got[n] = []; }
      log(`#${i} ${line} -> ${j(received)}`);
    }
    for (const n of names) await apps[n].done();
  },

  async streams(url, r, log) {
    const pick = (a) => a[Math.floor(r() * a.length)];
    const A = await client(url, "A", { lib });
    const apps = { B: await client(url, "B", { lib }), C: await client(url, "C", { lib }) };
    const server = [];
    const stream = await A.interop.createStream("Diff.Stream", {
      subscriptionRequestHandler: (req) => {
        const { mode, n } = req.arguments;
        server.push(`request ${n} ${mode} from ${req.instance.application}`);
        if (mode === "rej") req.reject(`no ${n}`);
        else if (mode === "b1" || mode === "b2") req.acceptOnBranch(mode);
        else req.accept();
      },
      subscriptionAddedHandler: (s) => server.push(`added ${s.arguments.n} on ${j(s.branchKey)}`),
      subscriptionRemovedHandler: (s) => server.push(`removed ${s.arguments.n}`),
    });
    for (const X of Object.values(apps)) await X.interop.waitForMethod("Diff.Stream");
    const open = new Map(); // n -> {who, events, mark, ended}
    for (let i = 1; i <= OPS; i++) {
      const k = r();
      let line;
      if (k < 0.3) {
        const who = pick(["B", "C"]);
        const mode = pick(["all", "b1", "b2", "rej"]);
        try {
          const sub = await apps[who].interop.subscribe("Diff.Stream", { arguments: { mode, n: i }, waitTimeoutMs: 0 });
          const t = { who, events: [], mark: 0, ended: false };
          sub.onData((d) => { if (d.data.mark !== undefined) t.mark = d.data.mark; else t.events.push(`${d.private ? "private" : "data"} ${j(d.data)}`); });
          sub.onClosed((c) => { t.ended = true; t.events.push(`closed ${c && c.message}`); });
          t.sub = sub;
          open.set(i, t);
          line = `${who} subscribes ${i} (${mode})`;
        } catch (e) {
          line = `${who} subscribes ${i} (${mode}): ${e.message || j(e)}`;
        }
      } else if (k < 0.38 && open.size) {
        const n = pick([...open.keys()]);
        open.get(n).sub.close();
        line = `${open.get(n).who} closes ${n}`;
      } else if (k < 0.8) {
        const branch = pick([undefined, "b1", "b2", "b3"]);
        stream.push({ i }, branch);
        line = `A pushes to ${j(branch)}`;
      } else if (k < 0.87) {
        const b = stream.branches(pick(["b1", "b2"]));
        line = `A closes branch ${b ? b.key : "(none)"}`;
        if (b) b.close();
      } else {
        const subs = stream.subscriptions();
        const s = subs.length ? subs[Math.floor(r() * subs.length)] : null;
        if (!s) line = "A has no subscription";
        else if (r() < 0.5) { s.push({ only: i }); line = `A pushes to ${s.arguments.n} alone`; }
        else { s.close(); line = `A drops ${s.arguments.n}`; }
      }
      // A marker to every subscription behind the step: each has it, or has ended.
      stream.push({ mark: i });
      try {
        await until(() => [...open.values()].every((t) => t.ended || t.mark === i), `every subscription to get marker ${i}`);
        // ... and the server's list agrees with the subscribers' (it hears of their closes later).
        const live = () => j([...open].filter(([, t]) => !t.ended).map(([n]) => n).sort((a, b) => a - b));
        const listed = () => j(stream.subscriptions().map((s) => s.arguments.n).sort((a, b) => a - b));
        await until(() => live() === listed(), `the server to list ${live()}`);
      } catch (e) {
        log(`#${i} ${line}: ${e.message}`);
        break;
      }
      const seen = {};
      for (const [n, t] of open) {
        if (t.events.length) seen[n] = t.events.splice(0);
        if (t.ended) open.delete(n);
      }
      log(`#${i} ${line} -> ${j(seen)} server ${j(server.splice(0).sort())}`);
    }
    for (const X of Object.values(apps)) await X.done();
    await A.done();
  },
};

async function run(url, seed) {
  const lines = [];
  await scenarios[scenario](url, rng(seed), (l) => lines.push(l));
  return lines;
}

(async () => {
  if (!scenarios[scenario]) throw new Error(`unknown scenario ${scenario}`);
  const ref = await referenceGateway();
  let differences = 0;
  for (const seed of seeds) {
    const want = await run(ref.url, seed);
    const have = await run(knitUrl, seed);
    if (process.env.SHOW) { console.log(want.join("\n")); console.log("----"); console.log(have.join("\n")); }
    let differing = 0;
    for (let i = 0; i < Math.max(want.length, have.length); i++) {
      if (want[i] === have[i]) continue;
      if (differing++ < 5) console.log(`seed ${seed}, line ${i}:\n  reference: ${want[i]}\n  knit:      ${have[i]}`);
    }
    differences += differing;
    console.log(`${scenario} seed ${seed}: ${want.length} lines on the reference, ${have.length} on knit, ${differing} differing`);
  }
  await ref.close();
  process.exit(differences ? 1 : 0);
})().catch((e) => { console.log(`failed: ${e && e.stack || e}`); process.exit(1); });
