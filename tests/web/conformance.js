#!/usr/bin/env node
// Runs the GW3 scenarios against a gateway through a recording relay and compares each
// transcript with its golden recording (tests/fixtures/gw3), frame by frame after
// normalisation. Differences knit keeps on purpose are masked (lib/transcript.js, documented in
// docs/gw3-conformance.md); anything else fails.
//
//   node conformance.js --url ws://127.0.0.1:PORT [--lib io|glue] [--out DIR] [scenario ...]
//
// The gateway must accept any `secret` login as its user (knit: `--ws-auth open`).
"use strict";
const fs = require("fs");
const path = require("path");
const { startRecorder } = require("./lib/recorder");
const { compare, readJsonl } = require("./lib/transcript");
const { scenarios } = require("./scenarios");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv.splice(i, 2)[1] : dflt; };
const url = opt("--url");
const lib = opt("--lib", "io");
const out = opt("--out");
const fixtures = path.join(__dirname, "..", "fixtures", "gw3", lib === "glue" ? "glue42-core-5.13" : "");
// One gateway serves every scenario in turn: `reconnect` leaves a retained context behind, so
// it comes last among the scenarios of its user ("harness").
const names = argv.length ? argv : lib === "glue"
  ? ["handshake", "invoke", "stream", "contexts", "bus", "reconnect"]
  : ["handshake", "auth", "invoke", "stream", "contexts", "bus", "edges", "reconnect"];

const frameCount = {};

async function runOne(name) {
  const rec = await startRecorder(url);
  const log = (label, value) => { if (process.env.KNIT_VERBOSE) console.log(`  [${name}] ${label} ${JSON.stringify(value)}`); };
  try {
    await scenarios[name]({ url: rec.url, log, lib, cut: rec.cut });
    await new Promise((r) => setTimeout(r, 300)); // the last frames
  } finally {
    await rec.close();
  }
  if (out) {
    fs.mkdirSync(out, { recursive: true });
    fs.writeFileSync(path.join(out, `${name}.jsonl`), rec.frames.map((f) => JSON.stringify(f)).join("\n") + "\n");
  }
  const golden = readJsonl(fs.readFileSync(path.join(fixtures, `${name}.jsonl`), "utf8"));
  frameCount[name] = rec.frames.length;
  return compare(golden, rec.frames);
}

(async () => {
  if (!url) throw new Error("--url is required");
  let passed = 0;
  let failed = 0;
  for (const name of names) {
    if (!scenarios[name]) throw new Error(`unknown scenario ${name}`);
    const t0 = Date.now();
    let diffs;
    try {
      diffs = await runOne(name);
    } catch (e) {
      diffs = [{ index: -1, golden: "the scenario to complete", candidate: String(e && e.stack || e) }];
    }
    const ms = Date.now() - t0;
    if (diffs.length === 0) {
      passed++;
      console.log(`ok ${name} (${lib}, ${frameCount[name]} frames) ${ms} ms`);
    } else {
      failed++;
      console.log(`FAIL ${name} (${lib}): ${diffs.length} differing frame(s)`);
      for (const d of diffs.slice(0, 8)) console.log(`  #${d.index}\n    golden:    ${d.golden}\n    candidate: ${d.candidate}`);
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.error(e); process.exit(2); });
