// What the web sides of tests/web.rs's mixed-world tests share: their command line
// (--url --user --secret [--lib io|glue]), connecting apps with it, and a loop that answers
// one JSON command per stdin line with one JSON line on stdout.
"use strict";
const readline = require("readline");
const { library } = require("../scenarios");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

// An app named `application`, logged in as the test's user.
const connect = (application) => library(opt("--lib", "io"))({
  application,
  gateway: { ws: opt("--url") },
  auth: { username: opt("--user"), password: opt("--secret") },
  bus: true,
  logger: "error",
});

// Resolves once `cond()` holds, or after `ms`.
async function until(cond, ms = 10000) {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await new Promise((r) => setImmediate(r));
}

// Says {"ready": true}, then answers each command with what `handle` returns ({"ok": true} when
// it returns nothing, {"error": MESSAGE} when it throws) until {"done": true}; then `leave()`
// and exit 0. A failure outside a command prints {"failed": …} and exits 1.
async function serve(handle, leave) {
  say({ ready: true });
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const cmd = JSON.parse(line);
    if (cmd.done) break;
    try {
      say((await handle(cmd)) || { ok: true });
    } catch (e) {
      say({ error: (e && (e.message || e.reason)) || String(e) });
    }
  }
  await leave();
  process.exit(0);
}

const fail = (e) => { say({ failed: String((e && e.stack) || e) }); process.exit(1); };

module.exports = { opt, say, connect, until, serve, fail };
