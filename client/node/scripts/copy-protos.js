// prepack: copies the wire contract into the package, so a tarball installed anywhere carries it;
// postpack (--remove) deletes the copy again.
'use strict';
const fs = require('fs');
const path = require('path');

const here = path.join(__dirname, '..');
const copies = [
  [path.join(here, '..', '..', 'proto', 'normd', 'v1', 'normd.proto'), path.join(here, 'proto', 'normd', 'v1', 'normd.proto')],
  [path.join(here, '..', 'proto', 'grpc', 'health', 'v1', 'health.proto'), path.join(here, 'proto', 'grpc', 'health', 'v1', 'health.proto')],
];
if (process.argv[2] === '--remove') {
  // postpack: a checkout keeps using the repository's files, never a stale copy.
  fs.rmSync(path.join(here, 'proto'), { recursive: true, force: true });
} else {
  for (const [from, to] of copies) {
    fs.mkdirSync(path.dirname(to), { recursive: true });
    fs.copyFileSync(from, to);
  }
}
