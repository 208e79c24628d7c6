// normd from Node.js: create a BatchNorm MLP, train it for a few steps, switch to eval mode and
// predict, with @grpc/grpc-js directly (index.js wraps the same calls in a Client class). The
// service definition is loaded from proto/normd/v1/normd.proto at run time.
//
//   npm ci && node example.js [--server 127.0.0.1:50051] [--id node-example] [--steps 40]
//
// The last line printed is a JSON summary (losses, accuracy, predictions) for scripts and tests.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The installed package's copy of the contract (npm pack puts it there), else the repository's.
function defaultProto() {
  const packaged = path.join(__dirname, 'proto', 'normd', 'v1', 'normd.proto');
  return fs.existsSync(packaged) ? packaged : path.join(__dirname, '..', '..', 'proto', 'normd', 'v1', 'normd.proto');
}

function parseArgs(argv) {
  const args = {
    server: process.env.NORMD_SERVER || '127.0.0.1:50051',
    id: 'node-example',
    steps: 40,
    proto: defaultProto(),
    timeoutMs: 30000,
  };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in args) || i + 1 >= argv.length) throw new Error(`unknown or incomplete flag ${argv[i]}`);
    args[key] = typeof args[key] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
  }
  return args;
}

// Tensors travel as raw little-endian float32 bytes; the first dimension is the batch.
function toTensor(rows) {
  const cols = rows[0].length;
  const raw = Buffer.alloc(rows.length * cols * 4);
  rows.forEach((row, r) => row.forEach((v, c) => raw.writeFloatLE(v, (r * cols + c) * 4)));
  return { shape: [rows.length, cols], raw };
}

function fromTensor(t) {
  const [n, cols] = t.shape.map(Number);
  const flat = t.raw.length > 0
    ? Array.from({ length: n * cols }, (_, i) => t.raw.readFloatLE(i * 4))
    : t.values;
  return Array.from({ length: n }, (_, r) => flat.slice(r * cols, (r + 1) * cols));
}

// A small deterministic generator, so every run sees the same data.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

// Three classes around three centres in four dimensions.
function makeBatch(random, n) {
  const centres = [[2, 0, 0, 1], [-2, 1, 0, -1], [0, -2, 2, 0]];
  const x = [];
  const labels = [];
  for (let i = 0; i < n; i++) {
    const label = Math.floor(random() * 3);
    // Sum of uniforms: roughly Gaussian noise, std ~0.5.
    x.push(centres[label].map((c) => c + (random() + random() + random() - 1.5)));
    labels.push(label);
  }
  return { x, labels };
}

function argmax(row) {
  return row.reduce((best, v, i) => (v > row[best] ? i : best), 0);
}

async function main() {
  const args = parseArgs(process.argv);
  const definition = protoLoader.loadSync(args.proto, {
    keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  const normd = grpc.loadPackageDefinition(definition).normd.v1;
  const client = new normd.Trainer(args.server, grpc.credentials.createInsecure());

  // Every call gets a deadline; a failed call rejects with the gRPC code and server message.
  const call = (method, request) => new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + args.timeoutMs);
    client[method](request, { deadline }, (err, response) => {
      if (err) {
        reject(new Error(`${method}: ${grpc.status[err.code]}: ${err.details}`));
      } else {
        resolve(response);
      }
    });
  });

  const spec = {
    input_shape: [4],
    layers: [
      { name: 'fc1', linear: { in_features: 4, out_features: 16 } },
      { name: 'bn1', batch_norm1d: { num_features: 16 } },
      { name: 'relu1', relu: {} },
      { name: 'out', linear: { in_features: 16, out_features: 3 } },
    ],
    loss: 'LOSS_CROSS_ENTROPY',
    optimizer: { sgd: { lr: 0.1, momentum: 0.9 } },
    seed: 3,
  };
  const model = await call('CreateModel', { id: args.id, spec });
  console.log(`created ${model.id}: ${model.parameter_count} parameters, mode ${model.mode}`);

  try {
    const random = rng(42);
    const losses = [];
    for (let step = 0; step < args.steps; step++) {
      const { x, labels } = makeBatch(random, 32);
      const r = await call('TrainStep', { model: model.id, input: toTensor(x), labels });
      losses.push(r.loss);
      if (step % 10 === 0 || step === args.steps - 1) {
        console.log(`step ${r.step}  loss ${r.loss.toFixed(4)}`);
      }
    }

    const evalModel = await call('SetMode', { model: model.id, mode: 'MODE_EVAL' });
    console.log(`mode ${evalModel.mode}; BatchNorm uses its running statistics now`);

    const test = makeBatch(random, 200);
    const forward = await call('Forward', { model: model.id, input: toTensor(test.x) });
    const outputs = fromTensor(forward.output);
    const predicted = outputs.map(argmax);
    const correct = predicted.filter((p, i) => p === test.labels[i]).length;
    const accuracy = correct / test.labels.length;
    console.log(`eval accuracy on 200 new samples: ${(100 * accuracy).toFixed(1)}%`);
    console.log(JSON.stringify({
      model: model.id,
      first_loss: losses[0],
      last_loss: losses[losses.length - 1],
      steps: losses.length,
      accuracy,
      output_shape: forward.output.shape.map(Number),
      predictions: predicted.slice(0, 10),
    }));
  } finally {
    await call('DeleteModel', { model: model.id });
    client.close();
  }
}

main().catch((err) => {
  console.error(`node example: ${err.message}`);
  process.exit(1);
});
