// normd's Node.js client: one Client per server address, one method per RPC, promises for unary
// calls and async iterators for streams. Tensors are { data: Float32Array, shape: number[] }
// (row-major, the first dimension is the batch); they travel as the proto's raw little-endian
// float32 bytes. Messages otherwise use the proto's own field names (snake_case), as
// proto/normd/v1/normd.proto and the README's JSON specs spell them. A failed call rejects with a
// NormdError carrying the gRPC status name (code) and the server's message.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { once } = require('events');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The packed tarball carries the protos under proto/ (scripts/copy-protos.js, run by prepack); a
// checkout uses the repository's own files.
function protoPath(packaged, ...inRepo) {
  const own = path.join(__dirname, 'proto', ...packaged);
  return fs.existsSync(own) ? own : path.join(__dirname, '..', ...inRepo);
}
const NORMD_PROTO = protoPath(['normd', 'v1', 'normd.proto'], '..', 'proto', 'normd', 'v1', 'normd.proto');
const HEALTH_PROTO = protoPath(['grpc', 'health', 'v1', 'health.proto'],
  'proto', 'grpc', 'health', 'v1', 'health.proto');

const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
let services = null;
function loadServices() {
  if (services === null) {
    const pkg = grpc.loadPackageDefinition(protoLoader.loadSync([NORMD_PROTO, HEALTH_PROTO], LOADER_OPTIONS));
    services = { Trainer: pkg.normd.v1.Trainer, Health: pkg.grpc.health.v1.Health };
  }
  return services;
}

class NormdError extends Error {
  // code: the gRPC status name ("NOT_FOUND", ...); details: the server's message.
  constructor(code, details, method) {
    super(`${method ? `${method}: ` : ''}${code}: ${details}`);
    this.name = 'NormdError';
    this.code = code;
    this.details = details;
    this.method = method || '';
  }
}

function wrapError(err, method) {
  if (err instanceof NormdError) return err;
  const name = typeof err.code === 'number' ? (grpc.status[err.code] || String(err.code)) : 'UNKNOWN';
  return new NormdError(name, err.details || err.message, method);
}

const LITTLE_ENDIAN = os.endianness() === 'LE';

// Flattens number[][]... into [Float32Array, shape].
function flattenNested(rows) {
  const shape = [];
  for (let level = rows; Array.isArray(level); level = level[0]) shape.push(level.length);
  const data = Float32Array.from(rows.flat(shape.length));
  const count = shape.reduce((a, b) => a * b, 1);
  if (data.length !== count) throw new TypeError(`ragged nested array: shape ${JSON.stringify(shape)}`);
  return { data, shape };
}

// { data, shape } (data: Float32Array or number[]), or a nested number array -> wire Tensor.
function toTensor(x) {
  const t = Array.isArray(x) ? flattenNested(x) : x;
  if (!t || t.data === undefined || !Array.isArray(t.shape)) {
    throw new TypeError('a tensor is { data: Float32Array | number[], shape: number[] } or a nested number array');
  }
  const data = t.data instanceof Float32Array ? t.data : Float32Array.from(t.data);
  const count = t.shape.reduce((a, b) => a * b, 1);
  if (count !== data.length) {
    throw new TypeError(`tensor shape ${JSON.stringify(t.shape)} holds ${count} values, data has ${data.length}`);
  }
  let raw;
  if (LITTLE_ENDIAN) {
    raw = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  } else {
    raw = Buffer.alloc(data.length * 4);
    data.forEach((v, i) => raw.writeFloatLE(v, i * 4));
  }
  return { shape: t.shape.map(Number), raw };
}

// Wire Tensor (raw or values encoding) -> { data: Float32Array, shape: number[] }.
function fromTensor(t) {
  if (!t) return null;
  const shape = (t.shape || []).map(Number);
  let data;
  if (t.raw && t.raw.length > 0) {
    data = new Float32Array(t.raw.length / 4);  // a copy: the Buffer may be unaligned
    for (let i = 0; i < data.length; i++) data[i] = t.raw.readFloatLE(i * 4);
  } else {
    data = Float32Array.from(t.values || []);
  }
  return { data, shape };
}

function readPem(value) {
  if (value === undefined || value === null) return null;
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return Buffer.from(value);
  if (typeof value === 'string') return value.includes('-----BEGIN') ? Buffer.from(value) : fs.readFileSync(value);
  throw new TypeError('a PEM option is a Buffer, PEM text or a file path');
}

function supervised(request, labels, target) {
  if ((labels === undefined || labels === null) === (target === undefined || target === null)) {
    throw new TypeError('give exactly one of labels (class indices) and target (a tensor)');
  }
  if (labels !== undefined && labels !== null) request.labels = Array.from(labels, Number);
  else request.target = toTensor(target);
  return request;
}

function modeName(mode) {
  const m = String(mode).toUpperCase();
  return m.startsWith('MODE_') ? m : `MODE_${m}`;
}

function stateToMap(tensors) {
  return new Map(tensors.map((t) => [t.name, fromTensor(t.tensor)]));
}

class Client {
  // address: "host:port". options: timeoutMs (per unary call, 30000), streamTimeoutMs (streams,
  // none), token (bearer token), tls (true: TLS with the system roots), ca / cert / key (PEM
  // Buffer, text or file path; any of them turns TLS on; cert+key: mutual TLS), serverName (the
  // name to check the server certificate against), channelOptions (passed to grpc-js).
  constructor(address = '127.0.0.1:50051', options = {}) {
    const { Trainer, Health } = loadServices();
    this.address = address;
    this.timeoutMs = options.timeoutMs === undefined ? 30000 : options.timeoutMs;
    this.streamTimeoutMs = options.streamTimeoutMs === undefined ? null : options.streamTimeoutMs;
    const useTls = Boolean(options.tls || options.ca || options.cert || options.key);
    if (Boolean(options.cert) !== Boolean(options.key)) throw new TypeError('cert and key go together');
    const credentials = useTls
      ? grpc.credentials.createSsl(readPem(options.ca), readPem(options.key), readPem(options.cert))
      : grpc.credentials.createInsecure();
    const channelOptions = { ...(options.channelOptions || {}) };
    if (options.serverName) channelOptions['grpc.ssl_target_name_override'] = options.serverName;
    this._token = options.token || null;
    this._trainer = new Trainer(address, credentials, channelOptions);
    this._health = new Health(address, credentials, channelOptions);
  }

  close() {
    this._trainer.close();
    this._health.close();
  }

  _metadata() {
    const md = new grpc.Metadata();
    if (this._token) md.set('authorization', `Bearer ${this._token}`);
    return md;
  }

  _callOptions(timeoutMs) {
    return timeoutMs ? { deadline: new Date(Date.now() + timeoutMs) } : {};
  }

  _call(method, request, stub = this._trainer) {
    return new Promise((resolve, reject) => {
      stub[method](request, this._metadata(), this._callOptions(this.timeoutMs), (err, response) => {
        if (err) reject(wrapError(err, method));
        else resolve(response);
      });
    });
  }

  // -- models ---------------------------------------------------------------------------------
  createModel(spec, id = '') { return this._call('CreateModel', { id, spec }); }
  getModel(model) { return this._call('GetModel', { model }); }
  async listModels() { return (await this._call('ListModels', {})).models; }
  async deleteModel(model) { await this._call('DeleteModel', { model }); }

  // mode: "train" / "eval" (or "MODE_TRAIN" / "MODE_EVAL").
  setMode(model, mode, { freezeRunningStats } = {}) {
    const request = { model, mode: modeName(mode) };
    if (freezeRunningStats !== undefined) request.freeze_running_stats = Boolean(freezeRunningStats);
    return this._call('SetMode', request);
  }
  resetRunningStats(model) { return this._call('ResetRunningStats', { model }); }
  updateOptimizer(model, optimizer) { return this._call('UpdateOptimizer', { model, optimizer }); }
  async saveModel(model) { return (await this._call('SaveModel', { model })).step; }

  // -- compute --------------------------------------------------------------------------------
  // { output, forwardId, layerStats, warnings }
  async forward(model, x, { retainForBackward = false, layerStats = false } = {}) {
    const r = await this._call('Forward', {
      model, input: toTensor(x), retain_for_backward: retainForBackward, layer_stats: layerStats,
    });
    return { output: fromTensor(r.output), forwardId: r.forward_id, layerStats: r.layer_stats, warnings: r.warnings };
  }
  // The grad input tensor when asked for, else null.
  async backward(model, forwardId, gradOutput, { returnGradInput = false } = {}) {
    const r = await this._call('Backward', {
      model, forward_id: forwardId, grad_output: toTensor(gradOutput), return_grad_input: returnGradInput,
    });
    return returnGradInput ? fromTensor(r.grad_input) : null;
  }
  async applyGradients(model) { return (await this._call('ApplyGradients', { model })).step; }

  // One optimisation step: labels (class indices) for cross-entropy, target (a tensor) otherwise.
  // Resolves to { loss, step, samples, warnings }.
  trainStep(model, x, { labels, target } = {}) {
    return this._call('TrainStep', supervised({ model, input: toTensor(x) }, labels, target));
  }

  // Streams batches ({ x, labels } or { x, target }; an iterable or async iterable) over one
  // TrainStream; yields one { loss, step, samples, warnings } per batch, in order.
  async* trainStream(model, batches) {
    const call = this._trainer.TrainStream(this._metadata(), this._callOptions(this.streamTimeoutMs));
    let inputError = null;
    const pump = (async () => {
      try {
        for await (const b of batches) {
          const request = supervised({ model, input: toTensor(b.x) }, b.labels, b.target);
          if (!call.write(request)) await once(call, 'drain');
        }
        call.end();
      } catch (err) {
        inputError = err;
        call.cancel();
      }
    })();
    let finished = false;
    try {
      for await (const r of call) yield r;
      finished = true;
    } catch (err) {
      await pump;
      throw inputError || wrapError(err, 'TrainStream');
    } finally {
      if (!finished) call.cancel();  // the consumer stopped early
    }
    await pump;
    if (inputError) throw inputError;
  }

  // Loss (and accuracy for cross-entropy) in eval semantics; changes nothing.
  evaluate(model, x, { labels, target } = {}) {
    return this._call('Evaluate', supervised({ model, input: toTensor(x) }, labels, target));
  }

  // -- state ----------------------------------------------------------------------------------
  // A Map of PyTorch state_dict names to tensors.
  async getState(model, { includeOptimizer = false } = {}) {
    const r = await this._call('GetState', { model, include_optimizer: includeOptimizer });
    return stateToMap(r.tensors);
  }
  // state: a Map or a plain object of names to tensors.
  setState(model, state, { strict = true } = {}) {
    const entries = state instanceof Map ? [...state.entries()] : Object.entries(state);
    const tensors = entries.map(([name, t]) => ({ name, tensor: toTensor(t) }));
    return this._call('SetState', { model, state: { tensors }, strict });
  }

  // -- BatchNorm's life in the service ---------------------------------------------------------
  // Streams unlabelled batches (tensors; iterable or async iterable); resolves to the Model.
  adaptStatistics(model, batches) {
    return new Promise((resolve, reject) => {
      const call = this._trainer.AdaptStatistics(this._metadata(), this._callOptions(this.streamTimeoutMs),
        (err, response) => (err ? reject(wrapError(err, 'AdaptStatistics')) : resolve(response)));
      (async () => {
        for await (const x of batches) {
          if (!call.write({ model, input: toTensor(x) })) await once(call, 'drain');
        }
        call.end();
      })().catch((err) => { call.cancel(); reject(err); });
    });
  }
  // layers: [{ layer, frozen?, trainable? }]
  setLayerOptions(model, layers) { return this._call('SetLayerOptions', { model, layers }); }
  // { spec, state (Map), model (null unless newModel was given) }
  async foldBatchNorm(model, { newModel = '' } = {}) {
    const r = await this._call('FoldBatchNorm', { model, new_model: newModel });
    return { spec: r.spec, state: stateToMap(r.state ? r.state.tensors : []), model: newModel ? r.model : null };
  }

  // -- health ---------------------------------------------------------------------------------
  // grpc.health.v1 Check: "SERVING", "NOT_SERVING", ...
  async health(service = '') {
    return (await this._call('Check', { service }, this._health)).status;
  }
}

module.exports = { Client, NormdError, toTensor, fromTensor, NORMD_PROTO, HEALTH_PROTO };
