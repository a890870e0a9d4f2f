#!/usr/bin/env node
// A real browser page: headless Chromium (driven by playwright-core) loads @interopio/core's
// browser build from a page served on 127.0.0.1, connects to knit's bridge, registers
// Browser.Hello and calls the native Native.Sum; follows the context `browser.ctx` and the
// native stream Native.Feed, and serves the stream Browser.Ticks. Driven by tests/web.rs like
// mixed.js:
//
//   node browser.js --url ws://127.0.0.1:PORT --user NAME --secret TOKEN [--screenshot FILE]
//
// Prints JSON lines, then {"ready":true}; then acts on stdin lines: "check" (waits until the
// page saw browser.ctx with v=1 and a Native.Feed item, prints them), "write" (the page updates
// `browser.out`), "push" (it pushes {b:1} on Browser.Ticks), "done" (ends it, exit 0).
"use strict";
const fs = require("fs");
const http = require("http");
const path = require("path");
const readline = require("readline");
const { chromium } = require("playwright-core");

const argv = process.argv.slice(2);
const opt = (name, dflt) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : dflt; };
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>knit bridge from a browser</title>
<script src="/core.umd.js"></script></head>
<body><h1>knit</h1><pre id="log">loading</pre></body></html>`;

function serve() {
  const bundle = fs.readFileSync(require.resolve("@interopio/core/dist/core.umd.js"));
  const server = http.createServer((req, res) => {
    if (req.url === "/core.umd.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(bundle);
    } else if (req.url === "/" || req.url === "/index.html") {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(PAGE);
    } else if (req.url === "/favicon.ico") {
      res.writeHead(204);
      res.end();
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

(async () => {
  const server = await serve();
  const browser = await chromium.launch({
    executablePath: process.env.KNIT_CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage();
    page.on("console", (m) => { if (m.type() === "error") process.stderr.write(`[page] ${m.text()}\n`); });
    await page.goto(`http://127.0.0.1:${server.address().port}/`);
    const r = await page.evaluate(async ([url, user, secret]) => {
      const factory = window.core.default || window.core;
      const io = await factory({ application: "browser-app", gateway: { ws: url }, auth: { username: user, password: secret } });
      window.io = io;
      await io.interop.register("Browser.Hello", (args, caller) =>
        ({ hello: args.name, from: navigator.userAgent.includes("Chrome") ? "chromium" : navigator.userAgent, caller: caller.application }));
      await io.interop.waitForMethod("Native.Sum");
      const sum = await io.interop.invoke("Native.Sum", { a: 1, b: 2 });
      // What the page sees, and a way to wait for it without polling.
      window.ctx = [];
      window.feed = [];
      const waiters = [];
      const wake = () => waiters.splice(0).forEach((w) => w());
      window.until = (cond) => new Promise((resolve) => {
        const look = () => (cond() ? resolve() : waiters.push(look));
        look();
      });
      await io.contexts.subscribe("browser.ctx", (data, delta) => { window.ctx.push({ data, delta }); wake(); });
      await io.interop.subscribe("Native.Feed", { onData: (d) => { window.feed.push(d.data); wake(); } });
      window.ticks = await io.interop.createStream("Browser.Ticks");
      document.getElementById("log").textContent =
        `peer ${io.connection.peerId}: Native.Sum(1, 2) = ${JSON.stringify(sum.returned)} by ${sum.executed_by.application}`;
      return { peerId: io.connection.peerId, user: io.connection.resolvedIdentity.user, sum: sum.returned, by: sum.executed_by.application };
    }, [opt("--url"), opt("--user"), opt("--secret")]);
    say({ step: "browser", ...r });
    if (opt("--screenshot")) await page.screenshot({ path: opt("--screenshot") });
    say({ ready: true });
    const lines = readline.createInterface({ input: process.stdin });
    for await (const line of lines) {
      const cmd = line.trim();
      if (cmd === "done") break;
      if (cmd === "check") {
        const seen = await page.evaluate(async () => {
          await window.until(() => window.ctx.some((c) => c.data.v === 1) && window.feed.length > 0);
          return { ctx: window.ctx[window.ctx.length - 1].data, feed: window.feed[0] };
        });
        say({ step: "seen", ...seen });
      } else if (cmd === "write") {
        await page.evaluate(() => window.io.contexts.update("browser.out", { from: "chromium" }));
        say({ step: "written" });
      } else if (cmd === "push") {
        await page.evaluate(() => window.ticks.push({ b: 1 }));
        say({ step: "pushed" });
      } else {
        throw new Error(`unknown command ${cmd}`);
      }
    }
    await page.evaluate(() => window.io.done());
  } finally {
    await browser.close();
    server.close();
  }
  process.exit(0);
})().catch((e) => { say({ error: String(e && e.stack || e) }); process.exit(1); });
