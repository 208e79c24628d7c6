#!/usr/bin/python3
"""Crash test: train with autosave, kill -9 the server at a random moment, restart, verify.

Each loop starts the server on the same data directory, checks every model came back, trains
and saves until a killer thread sends SIGKILL at a random moment (autosave after every step
means most kills land while a checkpoint is being written), and starts over.

After each kill the test reads the checkpoint files itself; after the restart every model's
whole state (every state_dict entry and optimizer slot as raw float32 bits, step, mode, frozen
flag) must equal the newest complete checkpoint on disk, be no older than its last acknowledged
SaveModel, and no newer than one step past its last acknowledged TrainStep. Every fifth loop
the newest checkpoint of one model is damaged first: it must be set aside and the previous one
restored. Training is deterministic (the batch of step k is a function of (model, k); the
dropout generator is checkpointed), so steps re-run after a restore must reproduce the first
run's bits.

While training, only the errors a kill produces (UNAVAILABLE, CANCELLED) and only once the kill
was sent end a loop; any other error, or one before the kill, fails the test. So does a run that
trained too little to prove anything: fewer acknowledged steps than NORMD_CRASH_MIN_STEPS
(default: one per loop) or fewer re-run steps checked against the first run than
NORMD_CRASH_MIN_CONTINUATIONS (default: one per 25 loops; the count depends on where the kills
fall, 17 to 187 in 50 loops here).

Environment: NORMD_CRASH_SERVER (the normd binary), NORMD_CRASH_SERVER_ARGS (extra flags),
NORMD_CRASH_LOOPS (default 50), NORMD_CRASH_SEED, NORMD_CRASH_STRICT_CONTINUATION (default 1),
NORMD_CRASH_MIN_STEPS, NORMD_CRASH_MIN_CONTINUATIONS.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

import normd

LOOPS = int(os.environ.get("NORMD_CRASH_LOOPS", "50"))
SEED = int(os.environ.get("NORMD_CRASH_SEED", "20261123"))
SERVER = os.environ["NORMD_CRASH_SERVER"]
EXTRA_ARGS = os.environ.get("NORMD_CRASH_SERVER_ARGS", "").split()
# Re-running a step from a restored state must give the first run's bits ("training continues as
# if never stopped"). NORMD_CRASH_STRICT_CONTINUATION=0 only reports differences (see README.md).
STRICT_CONTINUATION = os.environ.get("NORMD_CRASH_STRICT_CONTINUATION", "1") == "1"
# The least training a run must do for its checks to mean something (see the docstring).
MIN_STEPS = int(os.environ.get("NORMD_CRASH_MIN_STEPS", str(LOOPS)))
MIN_CONTINUATIONS = int(os.environ.get("NORMD_CRASH_MIN_CONTINUATIONS", str(max(1, LOOPS // 25))))
# What a call sees when the server is killed under it or before it: nothing else means "gone".
KILL_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

SPECS = {
    # BatchNorm + Dropout (the generator must come back) + AdamW, train mode.
    "mlp": {
        "input_shape": [6],
        "layers": [{"linear": {"in_features": 6, "out_features": 16}},
                   {"batch_norm1d": {"num_features": 16}},
                   {"relu": {}},
                   {"dropout": {"p": 0.25}},
                   {"linear": {"in_features": 16, "out_features": 3}}],
        "loss": "LOSS_CROSS_ENTROPY",
        "optimizer": {"adam": {"lr": 0.01, "weight_decay": 0.01, "decoupled_weight_decay": True}},
        "seed": 5,
    },
    # Conv + BatchNorm2d with frozen running statistics, SGD with Nesterov momentum, MSE.
    "conv": {
        "input_shape": [1, 5, 5],
        "layers": [{"conv2d": {"in_channels": 1, "out_channels": 3, "kernel_size": 3,
                               "padding": 1}},
                   {"batch_norm2d": {"num_features": 3, "momentum": 0.3}},
                   {"relu": {}},
                   {"flatten": {}},
                   {"linear": {"in_features": 75, "out_features": 2}}],
        "loss": "LOSS_MSE",
        "optimizer": {"sgd": {"lr": 0.05, "momentum": 0.9, "nesterov": True}},
        "seed": 6,
    },
}


def batch(model, step):
    """The batch of `step` for `model`: always the same."""
    rng = np.random.default_rng([sorted(SPECS).index(model), step])
    shape = SPECS[model]["input_shape"]
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    if model == "mlp":
        return x, rng.integers(0, 3, size=8).astype(np.int64), None
    return x, None, rng.standard_normal((8, 2)).astype(np.float32)


def fingerprint(client, model):
    """(step, mode, frozen, ((name, raw float32 bytes), ...)) of a live model."""
    m = client.get_model(model)
    state = client.get_state(model, include_optimizer=True)
    return (m.step, m.mode, m.running_stats_frozen,
            tuple((name, a.astype(np.float32).tobytes()) for name, a in state.items()))


# --- Reading checkpoint files (format: server/checkpoint.h) ------------------------------------

def _crc32c_table():
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data, crc=0):
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c = (c >> 8) ^ _CRC_TABLE[(c ^ byte) & 0xFF]
    return c ^ 0xFFFFFFFF


def _proto_fields(buf):
    """(field number, wire type, value) of a serialized protobuf message."""
    i = 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value
    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, buf[i:i + 8]
            i += 8
        elif wire == 2:
            n = varint()
            yield number, wire, buf[i:i + n]
            i += n
        elif wire == 5:
            yield number, wire, buf[i:i + 4]
            i += 4
        else:
            raise ValueError(f"wire type {wire}")


def read_checkpoint(path):
    """A complete checkpoint file as a fingerprint, or None when it does not verify."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12 or data[:8] != b"NORMDCK1" or int.from_bytes(data[8:12], "little") != 1:
        return None
    pos, payloads = 12, {}
    for expected in (1, 2, 3, 4):
        if pos + 16 > len(data):
            return None
        kind = int.from_bytes(data[pos:pos + 4], "little")
        length = int.from_bytes(data[pos + 4:pos + 12], "little")
        stored = int.from_bytes(data[pos + 12:pos + 16], "little")
        payload = data[pos + 16:pos + 16 + length]
        if kind != expected or len(payload) != length:
            return None
        if crc32c(payload, crc32c(data[pos:pos + 12])) != stored:
            return None
        payloads[kind] = payload
        pos += 16 + length
    if pos != len(data):
        return None
    step, mode, frozen = 0, 0, False
    for number, _, value in _proto_fields(payloads[1]):
        if number == 2:
            step = value
        elif number == 3:
            mode = value
        elif number == 4:
            frozen = bool(value)
    state = normd.pb.ModelState.FromString(payloads[3])
    return (step, mode, frozen, tuple((t.name, t.tensor.raw) for t in state.tensors))


def checkpoints_on_disk(data_dir, model):
    """{seq: fingerprint or None} of the model's checkpoint files, and its temp file count."""
    directory = os.path.join(data_dir, model)
    files, temps = {}, 0
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith("ckpt-") and name.endswith(".nckpt"):
                files[int(name[len("ckpt-") + 21:-len(".nckpt")])] = read_checkpoint(
                    os.path.join(directory, name))
            elif name.startswith(".tmp-"):
                temps += 1
    return files, temps


class Server:
    def __init__(self, data_dir, workdir):
        self.port_file = os.path.join(workdir, "port")
        if os.path.exists(self.port_file):
            os.remove(self.port_file)
        self.log = open(os.path.join(workdir, "server.log"), "ab")
        args = [SERVER, "--listen", "127.0.0.1:0", "--data-dir", data_dir,
                "--port-file", self.port_file, "--autosave-steps", "1",
                "--autosave-seconds", "0.05"] + EXTRA_ARGS
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while not os.path.exists(self.port_file):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            if time.time() > deadline:
                raise RuntimeError("server did not start within 60 s")
            time.sleep(0.01)
        with open(self.port_file) as f:
            port = dict(line.strip().split("=", 1) for line in f if "=" in line)["grpc"]
        self.client = normd.Client(f"127.0.0.1:{port}", timeout=30)
        self.kill_sent = threading.Event()  # set before the signal goes out

    def kill(self):
        self.kill_sent.set()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self):
        self.client.close()
        self.log.close()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.client.close()
        self.log.close()
        return code


def main():
    rnd = random.Random(SEED)
    workdir = tempfile.mkdtemp(prefix="normd-crash-")
    data_dir = os.path.join(workdir, "data")
    states = {m: {} for m in SPECS}     # model -> step -> fingerprint seen in the latest run
    durable = {m: 0 for m in SPECS}     # newest step a SaveModel acknowledged
    acked = {m: 0 for m in SPECS}       # newest step a TrainStep acknowledged
    failures = []
    kills_mid_write = 0
    restores = 0
    continuation_checked = continuation_diverged = 0
    steps_lost = []
    total_steps = 0
    kills = 0
    on_disk = {}
    damaged = []                        # (loop of the restart, model, file name)
    try:
        for loop in range(LOOPS + 1):
            server = Server(data_dir, workdir)
            c = server.client
            if loop == 0:
                for name, spec in SPECS.items():
                    c.create_model(spec, id=name)
                c.set_mode("conv", "train", freeze_running_stats=True)
                for name in SPECS:
                    states[name][0] = fingerprint(c, name)
            else:
                listed = sorted(m.id for m in c.list_models())
                if listed != sorted(SPECS):
                    failures.append(f"loop {loop}: models after restart {listed}")
                for name in SPECS:
                    fp = fingerprint(c, name)
                    step = fp[0]
                    restores += 1
                    steps_lost.append(acked[name] - step)
                    files = on_disk[name]
                    newest = files[max(files)] if files else None
                    # Exactly the newest checkpoint that was complete at the kill, bit for bit.
                    if fp != newest:
                        failures.append(f"loop {loop}: {name} restored at step {step} is not the "
                                        f"newest complete checkpoint on disk (step "
                                        f"{newest[0] if newest else None})")
                    if step < durable[name]:
                        failures.append(f"loop {loop}: {name} restored at step {step}, older than "
                                        f"its acknowledged save at step {durable[name]}")
                    # At most the one step whose reply the kill may have cut off.
                    if step > acked[name] + 1:
                        failures.append(f"loop {loop}: {name} restored at step {step}, beyond the "
                                        f"last acknowledged step {acked[name]}")
                    for when, model, fname in damaged:
                        if when == loop and model == name and not os.path.exists(
                                os.path.join(data_dir, name, "corrupt", fname)):
                            failures.append(f"loop {loop}: damaged {fname} was not set aside")
                    if states[name].get(step) != fp:
                        states[name] = {k: v for k, v in states[name].items() if k < step}
                    states[name][step] = fp
                    acked[name] = step
            if loop == LOOPS:
                code = server.stop()
                if code != 0:
                    failures.append(f"final SIGTERM: exit code {code}")
                break

            # Train until killed.
            training_failed = False
            killer = threading.Timer(rnd.uniform(0.05, 1.5), server.kill)
            killer.start()
            try:
                while True:
                    name = rnd.choice(sorted(SPECS))
                    if rnd.random() < 0.1:
                        durable[name] = max(durable[name], c.save_model(name))
                        continue
                    step = acked[name] + 1
                    x, labels, target = batch(name, step)
                    r = c.train_step(name, x, labels=labels, target=target)
                    if r.step != step:
                        failures.append(f"loop {loop}: {name} stepped to {r.step}, expected {step}")
                    acked[name] = r.step
                    total_steps += 1
                    fp = fingerprint(c, name)
                    if step in states[name]:
                        # The same step from the same state in an earlier run.
                        continuation_checked += 1
                        if states[name][step] != fp:
                            continuation_diverged += 1
                    states[name][step] = fp
            except normd.NormdError as e:
                # The server is gone only if the kill was sent and the error is one it causes.
                killed = server.kill_sent.is_set()
                if not killed or e.code not in KILL_CODES:
                    training_failed = True
                    failures.append(f"loop {loop}: {e} ({'after' if killed else 'before'} the "
                                    f"kill; only UNAVAILABLE or CANCELLED after it means the "
                                    f"server is gone)")
            killer.cancel()
            killer.join()
            if not server.kill_sent.is_set():
                server.kill()  # stopping early: the training loop failed before the kill
            server.close()
            if training_failed:
                break
            kills += 1
            for name in SPECS:
                files, temps = checkpoints_on_disk(data_dir, name)
                kills_mid_write += 1 if temps else 0
                if any(v is None for v in files.values()):
                    failures.append(f"loop {loop}: {name}: a renamed checkpoint does not verify")
                on_disk[name] = {k: v for k, v in files.items() if v is not None}
            # Every fifth loop, damage the newest checkpoint of one model (a bit flip or a cut):
            # the restart must set it aside and restore the previous one.
            if loop % 5 == 4:
                name = rnd.choice(sorted(SPECS))
                files = on_disk[name]
                if len(files) >= 2:
                    seq = max(files)
                    directory = os.path.join(data_dir, name)
                    path = next(os.path.join(directory, f) for f in os.listdir(directory)
                                if f.endswith(f"-{seq:020d}.nckpt"))
                    with open(path, "rb") as f:
                        data = bytearray(f.read())
                    if rnd.random() < 0.5:
                        bit = rnd.randrange(len(data) * 8)
                        data[bit // 8] ^= 1 << (bit % 8)
                    else:
                        del data[rnd.randrange(len(data)):]
                    with open(path, "wb") as f:
                        f.write(data)
                    del files[seq]
                    # The acknowledged save may be the file just damaged.
                    durable[name] = min(durable[name], files[max(files)][0])
                    damaged.append((loop + 1, name, os.path.basename(path)))
    finally:
        if failures:
            print(f"server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"crash loops: {kills} kill -9 + restart; {total_steps} acknowledged steps; "
          f"{kills_mid_write} kills left a checkpoint half-written (.tmp); {restores} model "
          f"restores, each equal bit for bit to the newest complete checkpoint on disk; steps "
          f"lost per restore (trained but not yet saved at the kill): max "
          f"{max(steps_lost) if steps_lost else 0}, mean "
          f"{sum(steps_lost) / max(1, len(steps_lost)):.2f}")
    print(f"damaged newest checkpoints: {len(damaged)} (bit flips and truncations), each set "
          f"aside and the previous checkpoint restored")
    print(f"continuation after restore: {continuation_checked} steps re-run from a restored state, "
          f"{continuation_diverged} not bit-identical to the first run")
    if continuation_diverged and STRICT_CONTINUATION:
        failures.append(f"{continuation_diverged} re-run steps differ from the first run")
    if total_steps < MIN_STEPS:
        failures.append(f"only {total_steps} acknowledged steps, fewer than the {MIN_STEPS} "
                        f"needed for the checks to mean something")
    if continuation_checked < MIN_CONTINUATIONS:
        failures.append(f"only {continuation_checked} re-run steps checked against the first "
                        f"run, fewer than {MIN_CONTINUATIONS}")
    for f in failures:
        print("FAIL:", f)
    print(f"{1 if not failures else 0} passed, {1 if failures else 0} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
