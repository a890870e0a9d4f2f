// Normalising and comparing GW3 transcripts (one record per frame: {conn, dir, msg}).
//
// What varies between runs and gateways is replaced by placeholders: gateway ids
// (`<kind>-<32 hex>-<n>`, numbered by kind in order of first appearance), client request ids,
// tokens, pids, timestamps and random metric ids. Frames are grouped by connection, direction
// and domain, keeping their order inside each group: the order across connections, directions
// and domains is timing (clients drive their domain sessions concurrently).
//
// `masks` are the differences knit keeps on purpose (docs/gw3-conformance.md): a masked field
// is compared as a placeholder, never silently dropped.
"use strict";

const GATEWAY_ID = /\b([picra])-[0-9a-f]{32}-\d+\b/g;

// Documented differences from the reference gateway (see docs/gw3-conformance.md).
const MASKS = [
  {
    why: "reference prints the offending message as a Clojure map in the reason",
    test: (m) => typeof m.reason_uri === "string" && m.reason_uri.endsWith(".errors.unhandled_message"),
    field: "reason",
  },
  {
    why: "reference prints its internal routing record in the reason",
    test: (m) => m.type === "error" && m.reason_uri === "global.errors.failure" &&
      typeof m.domain === "string" && !["global", "agm", "bus", "metrics", "context"].includes(m.domain),
    field: "reason",
  },
];

// Frames the reference gateway sends that knit deliberately does not (docs/gw3-conformance.md):
// announcements of contexts that belong to another user. The reference announces existing
// contexts of every user at login and tells readers of other users when a ref-counted or
// ownership context goes; users partition the world, so knit does neither. Dropped from the
// golden transcript only: if knit ever sent such a frame, it would show as a difference.
function crossUserContexts(frames) {
  const user = {};
  const owner = {};
  for (const f of frames) {
    const m = f.msg;
    if (!m || typeof m !== "object") continue;
    if (f.dir === "c2g" && m.type === "hello" && m.authentication) user[f.conn] = m.authentication.login;
    if (f.dir === "g2c" && m.type === "context-created") owner[m.context_id] = user[f.conn];
  }
  return frames.filter((f) => {
    const m = f.msg;
    if (f.dir !== "g2c" || !m || (m.type !== "context-added" && m.type !== "context-destroyed")) return true;
    const u = owner[m.context_id];
    return u === undefined || u === user[f.conn];
  });
}

function normalizer() {
  const seen = new Map();
  const placeholder = (kind, raw) => {
    const key = kind + "\u0000" + raw;
    if (!seen.has(key)) {
      const n = [...seen.keys()].filter((k) => k.startsWith(kind + "\u0000")).length + 1;
      seen.set(key, `<${kind}${n}>`);
    }
    return seen.get(key);
  };
  const value = (v, key) => {
    if (Array.isArray(v)) return v.map((x) => value(x));
    if (v && typeof v === "object") {
      const out = {};
      for (const k of Object.keys(v).sort()) out[k] = value(v[k], k);
      return out;
    }
    if (typeof v === "string") {
      if (key === "token" || key === "access_token") return "<token>";
      if (key === "request_id" && !/^[pr]-[0-9a-f]{32}-\d+$/.test(v)) return placeholder("q", v);
      return v.replace(GATEWAY_ID, (raw, kind) => placeholder(kind.toUpperCase(), raw));
    }
    if (typeof v === "number" && (key === "process" || key === "timestamp")) return `<${key}>`;
    return v;
  };
  return (frame) => {
    let msg = frame.msg;
    if (msg && typeof msg === "object" && !Array.isArray(msg)) {
      msg = { ...msg };
      for (const mask of MASKS) if (mask.test(msg) && mask.field in msg) msg[mask.field] = `<masked: ${mask.why}>`;
      if (msg.type === "join" && msg.destination === "metrics" && msg.options) msg.options = { ...msg.options, instance: "<rand>" };
      if (msg.domain === "metrics" && Array.isArray(msg.values)) {
        msg.values = msg.values.map((x) => (x.name === "/StartTime" ? { ...x, value: "<date>" } : x));
      }
    }
    return { conn: frame.conn, dir: frame.dir, msg: value(msg) };
  };
}

function normalize(frames, { filter } = {}) {
  const kept = filter ? frames.filter(filter) : frames.slice();
  const key = (f) => `${f.conn}\u0000${f.dir}\u0000${(f.msg && f.msg.domain) || "global"}`;
  const indexed = kept.map((f, i) => ({ f, i, k: key(f) }));
  indexed.sort((a, b) => (a.k < b.k ? -1 : a.k > b.k ? 1 : a.i - b.i));
  const norm = normalizer();
  return indexed.map((x) => JSON.stringify(norm(x.f)));
}

// Returns the list of differences (empty when equivalent).
function compare(golden, candidate, opts = {}) {
  const a = normalize(crossUserContexts(golden), opts);
  const b = normalize(candidate, opts);
  const diffs = [];
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (a[i] !== b[i]) diffs.push({ index: i, golden: a[i] || "<none>", candidate: b[i] || "<none>" });
  }
  return diffs;
}

function readJsonl(text) {
  return text.split("\n").filter((l) => l.trim()).map((l) => {
    const r = JSON.parse(l);
    return { conn: r.conn, dir: r.dir, msg: r.msg };
  });
}

module.exports = { compare, normalize, readJsonl, crossUserContexts, MASKS };
