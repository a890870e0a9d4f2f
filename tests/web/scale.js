#!/usr/bin/env node
// Many web apps on one gateway: N `@interopio/core` apps (in this process) log in one after
// another, each subscribes to one context and registers one method; then 20 context updates
// (each from a different app) must reach every app, every app invokes its neighbour's method,
// one app invokes a method by its name on every server at once (target "all"), and all leave
// together. Driven by tests/web.rs (with n = 100); by hand, for figures:
//
//   node scale.js --knit PATH/TO/knit [--n 200]     a `knit gateway` child process
//   node scale.js --reference [--n 200]             the reference gateway, in this process
//
// Prints one JSON line {gateway, n, logins_ms, methods_ms, fanout_ms, invoke_ms, invoke_all_ms,
// leave_ms, rss_kib} (rss_kib: knit's gateway process after start, logins, registrations and
// departures; null for the reference, which shares this process) and exits 1 if anything was
// missed, wrong, or (knit) if the gateway logged a warning or an error: a crowd coming and going
// is ordinary traffic.
"use strict";
const fs = require("fs");
const { client, waitFor } = require("./scenarios");
const { referenceGateway } = require("./lib/reference");
const { knitGateway } = require("./lib/knit");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const N = Number(opt("--n", 100));
const UPDATES = 20;
const WAIT_MS = 60000;

async function main() {
  const bin = opt("--knit");
  const reference = argv.includes("--reference");
  if (!bin && !reference) throw new Error("--knit PATH or --reference is required");
  const g = reference ? await referenceGateway() : await knitGateway(bin);
  // Polled every millisecond: the figures are the times things took, not the polling's step.
  const until = (cond, what) => waitFor(cond, what, WAIT_MS, 1);
  const rss = {};
  const mark = (k) => {
    if (g.pid) rss[k] = Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${g.pid}/status`, "utf8"))[1]);
  };
  const out = { gateway: reference ? "reference" : "knit", n: N };
  const problems = [];
  try {
    mark("start");
    let t = Date.now();
    const apps = [];
    for (let i = 0; i < N; i++) apps.push(await client(g.url, `S${i}`));
    out.logins_ms = Date.now() - t;
    mark("logins");

    const seen = new Array(N).fill(0);
    await Promise.all(apps.map((a, i) => a.contexts.subscribe("scale.ctx", (d) => { if (typeof d.v === "number") seen[i] = d.v; })));
    t = Date.now();
    await Promise.all(apps.map((a, i) => a.interop.register(`Scale.M${i}`, (x) => ({ i, x }))));
    await Promise.all(apps.map((a, i) => a.interop.register("Scale.All", () => ({ i }))));
    // Every app sees every other app's methods before anyone calls.
    await until(() => apps.every((a) => a.interop.methods().filter((m) => m.name.startsWith("Scale.M")).length === N),
      "every app to see every method");
    out.methods_ms = Date.now() - t;
    mark("methods");

    t = Date.now();
    for (let v = 1; v <= UPDATES; v++) {
      await apps[(v * 7) % N].contexts.update("scale.ctx", { v });
      await until(() => seen.every((x) => x >= v), `update ${v} to reach every app (${seen.filter((x) => x < v).length} missing)`);
    }
    out.fanout_ms = Date.now() - t;

    t = Date.now();
    const rs = await Promise.all(apps.map((a, i) => a.interop.invoke(`Scale.M${(i + 1) % N}`, { q: i })));
    out.invoke_ms = Date.now() - t;
    rs.forEach((r, i) => {
      if (r.returned.i !== (i + 1) % N || r.returned.x.q !== i) problems.push(`call ${i}: ${JSON.stringify(r.returned)}`);
    });

    t = Date.now();
    const all = await apps[0].interop.invoke("Scale.All", {}, "all");
    out.invoke_all_ms = Date.now() - t;
    const answered = new Set(all.all_return_values.map((r) => r.returned.i));
    if (answered.size !== N || all.all_errors.length) {
      problems.push(`"all" reached ${answered.size} of ${N} servers, ${all.all_errors.length} errors`);
    }

    t = Date.now();
    await Promise.all(apps.map((a) => a.done()));
    out.leave_ms = Date.now() - t;
    mark("left");
  } catch (e) {
    problems.push(e.message || String(e));
  }
  out.rss_kib = g.pid ? rss : null;
  if (g.log) {
    const c = g.log().split("\n").filter((l) => /\b(warn|error)\b/.test(l));
    if (c.length) problems.push(`the gateway complained: ${c.slice(0, 3).join(" | ")}${c.length > 3 ? ` (+${c.length - 3})` : ""}`);
  }
  console.log(JSON.stringify(out));
  await g.close();
  if (problems.length) {
    for (const p of problems) console.error(`scale: ${p}`);
    process.exit(1);
  }
  process.exit(0);
}

main().catch((e) => { console.error(e); process.exit(1); });
