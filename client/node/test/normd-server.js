// A real normd for the tests: NORMD_BIN started on free loopback ports (port 0 and --port-file),
// waited for until its health check answers SERVING, stopped with SIGTERM afterwards.
'use strict';

const { spawn } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { Client } = require('..');

function normdBinary() {
  const bin = process.env.NORMD_BIN;
  if (!bin) throw new Error('NORMD_BIN is not set: point it at a built normd (ctest sets it)');
  return bin;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// clientOptions: what the readiness probe needs to reach the server (TLS options).
async function startNormd(extraArgs = [], clientOptions = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'normd-node-test-'));
  const portFile = path.join(dir, 'ports');
  const log = fs.openSync(path.join(dir, 'normd.log'), 'a');
  const proc = spawn(normdBinary(), ['--listen', '127.0.0.1:0', '--metrics', '127.0.0.1:0',
    '--data-dir', path.join(dir, 'data'), '--port-file', portFile, ...extraArgs],
  { stdio: ['ignore', log, log] });
  let exited = null;
  proc.on('exit', (code) => { exited = code; });
  const server = {
    dir,
    address: null,
    log: () => fs.readFileSync(path.join(dir, 'normd.log'), 'utf8').slice(-5000),
    async stop() {
      if (exited === null) {
        const done = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGTERM');
        await done;
      }
      fs.closeSync(log);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  try {
    const deadline = Date.now() + 30000;
    while (server.address === null) {
      if (exited !== null) throw new Error(`normd exited with ${exited}`);
      if (Date.now() > deadline) throw new Error('normd wrote no port file within 30 s');
      try {
        const m = /^grpc=(\d+)$/m.exec(fs.readFileSync(portFile, 'utf8'));
        if (m && /^metrics=/m.test(fs.readFileSync(portFile, 'utf8'))) server.address = `127.0.0.1:${m[1]}`;
      } catch (err) { /* not written yet */ }
      if (server.address === null) await sleep(50);
    }
    const probe = new Client(server.address, { ...clientOptions, timeoutMs: 5000 });
    try {
      for (;;) {
        if (exited !== null) throw new Error(`normd exited with ${exited}`);
        if (Date.now() > deadline) throw new Error('normd did not become SERVING within 30 s');
        try {
          if (await probe.health() === 'SERVING') break;
        } catch (err) { /* not up yet */ }
        await sleep(50);
      }
    } finally {
      probe.close();
    }
  } catch (err) {
    process.stderr.write(`--- normd log ---\n${server.log()}\n`);
    await server.stop();
    throw err;
  }
  return server;
}

module.exports = { startNormd };
