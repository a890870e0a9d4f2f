// A `knit gateway` child process for the web scripts: a fresh socket directory, the bridge on
// an ephemeral loopback port in `open` authentication, plus `extra` arguments; resolves once the
// bridge listens, with its URL, its pid, what it has logged so far (`log()`) and `close()`.
"use strict";
const { spawn } = require("child_process");
const fs = require("fs");
const os = require("os");
const path = require("path");

async function knitGateway(bin, extra = []) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "knit-web-"));
  const child = spawn(bin, ["gateway", "--gateway", path.join(dir, "gw.sock"), "--ws", "127.0.0.1:0", "--ws-auth", "open",
    ...extra], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  const url = await new Promise((ok, fail) => {
    child.stderr.on("data", (d) => {
      log += d;
      const m = /bridge listening on (ws:\/\/[0-9.:]+)\//.exec(log);
      if (m) ok(m[1]);
    });
    child.once("exit", (code) => fail(new Error(`knit gateway exited (${code}): ${log}`)));
  });
  return {
    url,
    pid: child.pid,
    log: () => log,
    close: async () => { child.kill("SIGTERM"); fs.rmSync(dir, { recursive: true, force: true }); },
  };
}

module.exports = { knitGateway };
