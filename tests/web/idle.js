#!/usr/bin/env node
// What idle web connections of one user cost the gateway: for each N, a fresh `knit gateway`,
// N raw GW3 connections (no client library) of ONE user that log in with `hello` and then sit
// idle, and the gateway's anonymous memory (`RssAnon` of /proc/PID/status) before and after.
// Peers of one user see each other, so this is where per-pair state shows (docs/load.md,
// "Memory per web peer").
//
//   node idle.js --knit PATH/TO/knit [--n 250,500,1000] [--agm] [--users]
//
// --agm: every connection also joins `agm` (and is sent a `peer-added` for every other one);
// --users: every connection logs in as a user of its own (no peers in common), for the cost of
// a connection alone. Before the figure is read every connection answers one request sent
// after the last login: a connection handles the registry's notices queued before a frame from
// its client, so by then every connection has heard of every other one.
//
// Prints one JSON line per N: {n, agm, users, start_kib, idle_kib, per_conn_kib}.
"use strict";
const fs = require("fs");
const { knitGateway } = require("./lib/knit");
const { openAsk } = require("./lib/ask");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const NS = String(opt("--n", "250,500,1000")).split(",").map(Number);
const AGM = argv.includes("--agm");
const USERS = argv.includes("--users");
// Fewer at once than the bridge's `max_pending_logins` (128), which evicts the longest waiting.
const BATCH = 50;

function rssAnon(pid) {
  return Number(/RssAnon:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
}

async function login(url, i) {
  const ws = await openAsk(url);
  const login = USERS ? `idle${i}` : "idle";
  const w = await ws.ask({ type: "hello", request_id: "h", identity: { application: `idle-${i}` },
    authentication: { method: "secret", login, secret: "x" } });
  if (w.type !== "welcome") throw new Error(`login ${i}: ${JSON.stringify(w)}`);
  ws.id = w.peer_id;
  if (AGM) {
    const j = await ws.ask({ type: "join", domain: "global", destination: "agm", request_id: "j", peer_id: ws.id });
    if (j.type !== "success") throw new Error(`join ${i}: ${JSON.stringify(j)}`);
  }
  return ws;
}

async function one(bin, n) {
  const g = await knitGateway(bin);
  const conns = [];
  try {
    const start = rssAnon(g.pid);
    for (let i = 0; i < n; i += BATCH) {
      const batch = [];
      for (let k = i; k < Math.min(n, i + BATCH); k++) batch.push(login(g.url, k));
      conns.push(...(await Promise.all(batch)));
    }
    // One answered request per connection, sent after the last login (see the top).
    await Promise.all(conns.map((ws) => ws.ask({ type: "join", domain: "global", destination: "metrics",
      request_id: "s", peer_id: ws.id })));
    const idle = rssAnon(g.pid);
    const warn = g.log().split("\n").filter((l) => /\b(warn|error)\b/.test(l));
    if (warn.length) throw new Error(`the gateway complained: ${warn.slice(0, 3).join(" | ")}`);
    return { n, agm: AGM, users: USERS, start_kib: start, idle_kib: idle, per_conn_kib: +((idle - start) / n).toFixed(1) };
  } finally {
    for (const ws of conns) ws.terminate();
    await g.close();
  }
}

async function main() {
  const bin = opt("--knit");
  if (!bin) throw new Error("--knit PATH is required");
  for (const n of NS) console.log(JSON.stringify(await one(bin, n)));
}

main().catch((e) => { console.error(e); process.exit(1); });
