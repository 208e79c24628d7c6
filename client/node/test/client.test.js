// normd's Node client against a real normd (NORMD_BIN): every Client method, tensors both ways,
// errors with their gRPC status, TrainStream as an async iterator, state round trips, the ESM
// entry point, and TLS / mutual TLS / bearer-token options on the wire.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const normd = require('..');
const { Client, NormdError, toTensor, fromTensor } = normd;
const { startNormd } = require('./normd-server');

// A small deterministic generator, so every run sees the same data.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

// Three classes around three centres in four dimensions: { x: {data, shape}, labels }.
function batch(random, n) {
  const centres = [[2, 0, 0, 1], [-2, 1, 0, -1], [0, -2, 2, 0]];
  const data = new Float32Array(n * 4);
  const labels = [];
  for (let i = 0; i < n; i++) {
    const label = Math.floor(random() * 3);
    centres[label].forEach((c, j) => { data[i * 4 + j] = c + (random() + random() + random() - 1.5); });
    labels.push(label);
  }
  return { x: { data, shape: [n, 4] }, labels };
}

const SPEC = {
  input_shape: [4],
  layers: [
    { name: 'fc1', linear: { in_features: 4, out_features: 16 } },
    { name: 'bn1', batch_norm1d: { num_features: 16 } },
    { relu: {} },
    { name: 'out', linear: { in_features: 16, out_features: 3 } },
  ],
  loss: 'LOSS_CROSS_ENTROPY',
  optimizer: { sgd: { lr: 0.1, momentum: 0.9 } },
  seed: 3,
};

test('tensors: raw float32 both ways, nested arrays, shape checks', () => {
  const t = toTensor({ data: new Float32Array([1.5, -2, 3.25, 0.1]), shape: [2, 2] });
  assert.deepEqual(t.shape, [2, 2]);
  assert.equal(t.raw.length, 16);
  assert.equal(t.raw.readFloatLE(4), -2);
  const back = fromTensor(t);
  assert.deepEqual(back.shape, [2, 2]);
  assert.deepEqual(Array.from(back.data), [1.5, -2, 3.25, Math.fround(0.1)]);
  assert.deepEqual(toTensor([[1, 2, 3], [4, 5, 6]]).shape, [2, 3]);
  assert.deepEqual(Array.from(fromTensor({ shape: [3], values: [1, 2, 3] }).data), [1, 2, 3]);
  assert.throws(() => toTensor({ data: [1, 2, 3], shape: [2, 2] }), /holds 4 values, data has 3/);
  assert.throws(() => toTensor([[1, 2], [3]]), /ragged/);
});

test('the ESM entry point exports the same client', async () => {
  const esm = await import('normd');
  assert.equal(esm.Client, Client);
  assert.equal(esm.default.NormdError, NormdError);
});

test('against a real normd', async (t) => {
  const server = await startNormd(['--in-memory']);
  const client = new Client(server.address);
  t.after(async () => { client.close(); await server.stop(); });

  await t.test('health', async () => {
    assert.equal(await client.health(), 'SERVING');
    assert.equal(await client.health('normd.v1.Trainer'), 'SERVING');
  });

  await t.test('create, get, list, delete', async () => {
    const model = await client.createModel(SPEC, 'm1');
    assert.equal(model.id, 'm1');
    assert.equal(model.mode, 'MODE_TRAIN');
    assert.equal(model.parameter_count, 4 * 16 + 16 + 2 * 16 + 16 * 3 + 3);
    assert.deepEqual(model.output_shape, [3]);
    assert.equal((await client.getModel('m1')).spec.layers[1].batch_norm1d.num_features, 16);
    const picked = await client.createModel(SPEC);
    assert.notEqual(picked.id, '');
    assert.deepEqual((await client.listModels()).map((m) => m.id).sort(), ['m1', picked.id].sort());
    await client.deleteModel(picked.id);
    assert.deepEqual((await client.listModels()).map((m) => m.id), ['m1']);
  });

  await t.test('errors carry the gRPC status and the server message', async () => {
    await assert.rejects(client.getModel('nope'), (err) => {
      assert.ok(err instanceof NormdError);
      assert.equal(err.code, 'NOT_FOUND');
      assert.equal(err.method, 'GetModel');
      assert.match(err.details, /nope/);
      return true;
    });
    await assert.rejects(client.createModel(SPEC, 'm1'), { code: 'ALREADY_EXISTS' });
    await assert.rejects(client.trainStep('m1', { data: new Float32Array(6), shape: [2, 3] }, { labels: [0, 1] }),
      { code: 'INVALID_ARGUMENT' });
    assert.throws(() => client.trainStep('m1', [[1, 2, 3, 4]], {}), /exactly one of labels/);
  });

  await t.test('trainStep, setMode, forward, evaluate', async () => {
    const random = rng(42);
    const losses = [];
    for (let i = 0; i < 30; i++) {
      const b = batch(random, 32);
      const r = await client.trainStep('m1', b.x, { labels: b.labels });
      assert.equal(r.step, i + 1);
      assert.equal(r.samples, 32);
      losses.push(r.loss);
    }
    assert.ok(losses[29] < losses[0] / 2, `loss ${losses[0]} -> ${losses[29]}`);
    assert.equal((await client.setMode('m1', 'eval')).mode, 'MODE_EVAL');
    const test200 = batch(random, 200);
    const f = await client.forward('m1', test200.x);
    assert.deepEqual(f.output.shape, [200, 3]);
    assert.ok(f.output.data instanceof Float32Array);
    let correct = 0;
    for (let i = 0; i < 200; i++) {
      const row = Array.from(f.output.data.subarray(i * 3, i * 3 + 3));
      if (row.indexOf(Math.max(...row)) === test200.labels[i]) correct++;
    }
    const e = await client.evaluate('m1', test200.x, { labels: test200.labels });
    assert.equal(e.samples, 200);
    assert.ok(Math.abs(e.accuracy - correct / 200) < 1e-9, `${e.accuracy} vs ${correct / 200}`);
    assert.ok(e.accuracy >= 0.9, `accuracy ${e.accuracy}`);
    assert.equal((await client.setMode('m1', 'MODE_TRAIN')).mode, 'MODE_TRAIN');
  });

  await t.test('trainStream is an async iterator over a generator of batches', async () => {
    const start = (await client.getModel('m1')).step;
    async function* batches() {
      const random = rng(7);
      for (let i = 0; i < 12; i++) yield batch(random, 16);
    }
    const steps = [];
    for await (const r of client.trainStream('m1', batches())) {
      assert.equal(r.samples, 16);
      assert.ok(Number.isFinite(r.loss));
      steps.push(r.step);
    }
    assert.deepEqual(steps, Array.from({ length: 12 }, (_, i) => start + i + 1));
    // A server error ends the iteration with a NormdError.
    const bad = [{ x: { data: new Float32Array(3), shape: [1, 3] }, labels: [0] }];
    await assert.rejects(async () => { for await (const r of client.trainStream('m1', bad)) void r; },
      (err) => err instanceof NormdError && err.code === 'INVALID_ARGUMENT' && err.method === 'TrainStream');
    // A bad batch on the client side ends it with that error.
    await assert.rejects(async () => { for await (const r of client.trainStream('m1', [{ x: [[1, 2, 3, 4]] }])) void r; },
      /exactly one of labels/);
    assert.equal((await client.getModel('m1')).step, start + 12);
  });

  await t.test('MSE with a target tensor', async () => {
    const spec = { input_shape: [2], layers: [{ linear: { in_features: 2, out_features: 1 } }],
      loss: 'LOSS_MSE', optimizer: { sgd: { lr: 0.1 } }, seed: 1 };
    await client.createModel(spec, 'reg');
    const random = rng(5);
    const x = new Float32Array(64 * 2).map(() => random() * 2 - 1);
    const y = new Float32Array(64).map((_, i) => 3 * x[2 * i] - x[2 * i + 1] + 0.5);
    const first = await client.trainStep('reg', { data: x, shape: [64, 2] }, { target: { data: y, shape: [64, 1] } });
    let last = first;
    for (let i = 0; i < 50; i++) last = await client.trainStep('reg', { data: x, shape: [64, 2] }, { target: { data: y, shape: [64, 1] } });
    assert.ok(last.loss < first.loss / 10, `${first.loss} -> ${last.loss}`);
    await client.deleteModel('reg');
  });

  await t.test('getState / setState round trip', async () => {
    const state = await client.getState('m1');
    assert.deepEqual([...state.keys()], ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean',
      '1.running_var', '1.num_batches_tracked', '3.weight', '3.bias']);
    assert.deepEqual(state.get('0.weight').shape, [16, 4]);
    assert.equal(state.get('1.num_batches_tracked').data[0], (await client.getModel('m1')).step);
    await client.createModel({ ...SPEC, seed: 99 }, 'copy');
    await client.setState('copy', state);
    await client.setMode('m1', 'eval');
    await client.setMode('copy', 'eval');
    const x = batch(rng(11), 8).x;
    const a = (await client.forward('m1', x)).output.data;
    const b = (await client.forward('copy', x)).output.data;
    assert.deepEqual(Array.from(b), Array.from(a));
    assert.deepEqual([...(await client.getState('copy')).keys()], [...state.keys()]);
    // strict: a missing name is refused and nothing changes.
    const partial = Object.fromEntries([...state.entries()].slice(0, 2));
    await assert.rejects(client.setState('copy', partial), { code: 'INVALID_ARGUMENT' });
    await client.deleteModel('copy');
  });

  await t.test('forward / backward / applyGradients', async () => {
    await client.setMode('m1', 'train');
    const before = (await client.getModel('m1')).step;
    const x = batch(rng(3), 4).x;
    const f = await client.forward('m1', x, { retainForBackward: true, layerStats: true });
    assert.equal(f.layerStats.length, 4);
    const g = await client.backward('m1', f.forwardId, { data: new Float32Array(12).fill(0.1), shape: [4, 3] },
      { returnGradInput: true });
    assert.deepEqual(g.shape, [4, 4]);
    assert.equal(await client.applyGradients('m1'), before + 1);
  });

  await t.test('setLayerOptions, foldBatchNorm, adaptStatistics', async () => {
    let model = await client.setLayerOptions('m1', [{ layer: 'bn1', frozen: true }, { layer: 'fc1', trainable: false }]);
    const opts = Object.fromEntries(model.layer_options.map((o) => [o.layer, o]));
    assert.equal(opts.bn1.frozen, true);
    assert.equal(opts.fc1.trainable, false);
    await assert.rejects(client.setLayerOptions('m1', [{ layer: 'out', frozen: true }]), { code: 'INVALID_ARGUMENT' });
    await client.setLayerOptions('m1', [{ layer: 'bn1', frozen: false }, { layer: 'fc1', trainable: true }]);

    const fold = await client.foldBatchNorm('m1', { newModel: 'm1-folded' });
    assert.equal(fold.spec.layers.length, SPEC.layers.length - 1);
    assert.equal(fold.model.inference_only, true);
    assert.ok(fold.state.has('0.bias'));
    await client.deleteModel('m1-folded');

    const random = rng(7);
    const batch = (n) => ({ data: Float32Array.from({ length: n * 4 }, () => 3 + 2 * random()), shape: [n, 4] });
    const before = await client.getState('m1');
    model = await client.adaptStatistics('m1', [batch(8), batch(20), batch(5)]);
    assert.equal(model.id, 'm1');
    const after = await client.getState('m1');
    assert.equal(after.get('1.num_batches_tracked').data[0], before.get('1.num_batches_tracked').data[0] + 3);
    assert.notDeepEqual([...after.get('1.running_mean').data], [...before.get('1.running_mean').data]);
    assert.deepEqual([...after.get('0.weight').data], [...before.get('0.weight').data]);
    await assert.rejects(client.adaptStatistics('m1', []), { code: 'INVALID_ARGUMENT' });
  });
});

function openssl(dir, ...args) {
  execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
}

// ca.pem; server.{pem,key} for 127.0.0.1/localhost; client.{pem,key}.
function makePki(dir) {
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  openssl(dir, 'req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '1', '-subj', '/CN=ca');
  for (const [name, ext] of [['server', 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n'],
    ['client', 'extendedKeyUsage=clientAuth\n']]) {
    fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
    openssl(dir, 'req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    openssl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
      '-out', `${name}.pem`, '-days', '1', '-extfile', `${name}.ext`);
  }
}

test('TLS, mutual TLS and a bearer token against a real normd', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'normd-node-tls-'));
  makePki(dir);
  const token = 'node-test-token';
  fs.writeFileSync(path.join(dir, 'tokens'), `${token}\n`);
  const pem = (name) => path.join(dir, name);
  const mtls = { ca: pem('ca.pem'), cert: pem('client.pem'), key: fs.readFileSync(pem('client.key')) };
  const server = await startNormd(['--in-memory', '--tls-cert', pem('server.pem'), '--tls-key', pem('server.key'),
    '--tls-client-ca', pem('ca.pem'), '--auth-token-file', pem('tokens')], mtls);
  const clients = [];
  const connect = (options) => {
    const c = new Client(server.address, { timeoutMs: 10000, ...options });
    clients.push(c);
    return c;
  };
  t.after(async () => {
    clients.forEach((c) => c.close());
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const good = connect({ ...mtls, token });
  await good.createModel(SPEC, 'secure');
  const b = batch(rng(1), 16);
  assert.equal((await good.trainStep('secure', b.x, { labels: b.labels })).step, 1);
  const streamed = [];
  for await (const r of good.trainStream('secure', [b, b])) streamed.push(r.step);
  assert.deepEqual(streamed, [2, 3]);
  // Same name checked explicitly; the CA given as PEM text.
  const named = connect({ ...mtls, ca: fs.readFileSync(pem('ca.pem'), 'utf8'), serverName: 'localhost', token });
  assert.deepEqual((await named.listModels()).map((m) => m.id), ['secure']);

  await assert.rejects(connect({ ...mtls }).listModels(), { code: 'UNAUTHENTICATED' });
  await assert.rejects(connect({ ...mtls, token: 'wrong' }).listModels(), { code: 'UNAUTHENTICATED' });
  // No client certificate, or no TLS at all: the handshake fails.
  await assert.rejects(connect({ ca: pem('ca.pem'), token, timeoutMs: 3000 }).listModels(), { code: 'UNAVAILABLE' });
  await assert.rejects(connect({ token, timeoutMs: 3000 }).listModels(), { code: 'UNAVAILABLE' });
  assert.throws(() => new Client(server.address, { cert: pem('client.pem') }), /cert and key go together/);
});
