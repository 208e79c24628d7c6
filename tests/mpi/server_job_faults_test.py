"""normd as a data-parallel job (issue 12): start-up check, stop, restart and a dead worker.

Usage (ctest, label mpi): server_job_faults_test.py RANKS TRANSPORT

- Ranks started with different model-affecting flags refuse to form a job: every rank exits 2
  and the log names the flag and both values.
- SIGTERM to the launcher (deploy/normd-mpirun): the job drains, saves and exits 0; a new job on
  the same data directory holds every acknowledged step, bit-identical to what the first job
  held, on every rank (CheckReplicas), and trains on equal to a single process restored from the
  same files.
- kill -9 of a worker while rank 0 trains: calls end UNAVAILABLE and the job exits non-zero,
  nothing hangs (bounded waits); a new job restores the newest checkpoint on every rank.
- The same with a worker stopped (SIGSTOP: alive, but it never answers): rank 0's watchdog
  (--job-stall-timeout 3) ends the job no earlier than the timeout, says why in its log, and the
  stopped rank does not outlive the job.
  Prints how long each took.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server_job_test as sj  # noqa: E402
from server_job_test import Job, NormdServer, check, compare_state  # noqa: E402

import normd  # noqa: E402

FAILURES = sj.FAILURES


class SingleOn(NormdServer):
    """A plain normd on a copy of the data directory `source`."""

    def __init__(self, source, extra_args=()):
        super().__init__(extra_args)
        self.source = source

    def __enter__(self):
        self.tmp = tempfile.mkdtemp(prefix="normd-job-single-")
        self.data_dir = os.path.join(self.tmp, "data")
        shutil.copytree(self.source, self.data_dir)
        self.log_path = os.path.join(self.tmp, "normd.log")
        self.client = None
        try:
            self._start()
        except BaseException:
            self._stop()
            self._cleanup()
            raise
        return self


def worker_pids(job, rank):
    """The pids of the job's processes of `rank` (by their environment and command line)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and job.port_file.encode() in cmd:
            pids.append(int(p))
    return pids


def data(rng, rows=257):
    return (rng.standard_normal((rows, 16)).astype(np.float32), rng.integers(0, 4, rows))


def mismatch(ranks, transport):
    tmp = tempfile.mkdtemp(prefix="normd-job-mismatch-")
    try:
        btl = "self,vader" if transport == "shm" else "self,tcp"
        common = [os.environ["NORMD_BIN"], "--in-memory", "--listen", "127.0.0.1:0",
                  "--metrics", "127.0.0.1:0"]
        # MPMD: rank 0 with the default --max-layers, the others with another value.
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", btl,
               "-np", "1"] + common + [":", "-np", str(ranks - 1)] + common + ["--max-layers",
                                                                                "100"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NORMD_")}
        env["OMPI_MCA_btl_tcp_if_include"] = "lo"
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        log = r.stdout + r.stderr
        if r.returncode != 2:
            FAILURES.append(f"mismatched flags: the job exited {r.returncode}, not 2:\n{log}")
        want = "differs from rank 0 in --max-layers: rank 0 has '256', rank 1 has '100'"
        if want not in log:
            FAILURES.append(f"mismatched flags: no message naming the difference:\n{log}")
        if "event=serving" in log:
            FAILURES.append("mismatched flags: rank 0 served anyway")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stop_and_restart(ranks, transport):
    tmp = tempfile.mkdtemp(prefix="normd-job-restart-")
    rng = np.random.default_rng(5)
    try:
        data_dir = os.path.join(tmp, "data")
        # No autosave trigger: what is on disk after the stop was saved by the drain.
        flags = ["--autosave-seconds", "0"]
        job = Job(ranks, transport, data_dir=data_dir, extra=flags)
        c = job.client
        c.create_model(sj.mlp_spec(), "mlp")
        steps = [data(rng) for _ in range(7)]
        for x, y in steps:
            last = c.train_step("mlp", x, labels=y).step
        before = c.get_state("mlp", include_optimizer=True)
        digest = c.check_replicas().digests[0]
        code = job.stop()
        if code != 0:
            FAILURES.append(f"SIGTERM to normd-mpirun: exit {code}\n{job.log()[-3000:]}")
        saved = os.path.join(tmp, "saved")
        shutil.copytree(data_dir, saved)

        job = Job(ranks, transport, data_dir=data_dir, extra=flags)
        try:
            c = job.client
            if c.get_model("mlp").step != last:
                FAILURES.append(f"restart: step {c.get_model('mlp').step}, acknowledged {last}")
            after = c.get_state("mlp", include_optimizer=True)
            for name in before:
                if not np.array_equal(before[name], after[name]):
                    FAILURES.append(f"restart: {name} differs from before the stop")
            r = sj.replicas_agree(c, "after restart", ranks)
            if r.digests[0] != digest:
                FAILURES.append("restart: the digest differs from the first job's")
            with SingleOn(saved, ["--compute-threads", "1"]) as ref:
                for x, y in [data(rng) for _ in range(3)]:
                    a = c.train_step("mlp", x, labels=y)
                    b = ref.client.train_step("mlp", x, labels=y)
                    check("loss", "after restart", [a.loss], [b.loss])
                compare_state("after restart and 3 steps", c, ref.client, "mlp")
        finally:
            job.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A stopped worker is caught by rank 0's watchdog after this long.
STALL_TIMEOUT_S = 3


def fail_worker(ranks, transport, how):
    """how = "kill": kill -9 of the last rank; "stop": SIGSTOP of it (alive but hung), which only
    rank 0's watchdog (--job-stall-timeout) can notice. Either way, while a thread trains: calls
    end UNAVAILABLE, the job exits non-zero within bounded time, no process is left, and a new
    job restores the newest checkpoint on every rank."""
    what = {"kill": "kill -9 of a worker", "stop": "a stopped worker (SIGSTOP)"}[how]
    tmp = tempfile.mkdtemp(prefix=f"normd-job-{how}-")
    rng = np.random.default_rng(9)
    try:
        data_dir = os.path.join(tmp, "data")
        flags = ["--autosave-steps", "5", "--autosave-seconds", "0",
                 "--job-stall-timeout", str(STALL_TIMEOUT_S)]
        job = Job(ranks, transport, data_dir=data_dir, extra=flags)
        c = job.client
        c.create_model(sj.mlp_spec(), "mlp")
        x, y = data(rng, 512)
        for _ in range(12):
            c.train_step("mlp", x, labels=y)
        victims = worker_pids(job, ranks - 1)
        if len(victims) != 1:
            FAILURES.append(f"{what}: found worker pids {victims}")
            job.kill()
            return
        errors = []
        stop = threading.Event()

        def train():
            while not stop.is_set():
                try:
                    c.train_step("mlp", x, labels=y, timeout=30)
                except normd.NormdError as e:
                    errors.append((time.monotonic(), e.code))
                    time.sleep(0.1)

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        time.sleep(0.3)
        failed = time.monotonic()
        os.kill(victims[0], signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        try:
            code = job.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
            FAILURES.append(f"{what}: the job still runs after 60 s")
            job.kill()
        exited = time.monotonic() - failed
        time.sleep(0.5)
        stop.set()
        thread.join(timeout=60)
        if code == 0:
            FAILURES.append(f"{what}: the job exited 0")
        if how == "stop":
            # The watchdog ends rank 0 once one operation has waited the timeout; the launcher
            # then takes the stopped rank down with it.
            if exited < STALL_TIMEOUT_S:
                FAILURES.append(f"{what}: the job ended after {exited:.2f} s, before the "
                                f"{STALL_TIMEOUT_S} s stall timeout")
            if "--job-stall-timeout" not in job.log():
                FAILURES.append(f"{what}: rank 0's log does not say why the job ended")
            if os.path.exists(f"/proc/{victims[0]}"):
                with open(f"/proc/{victims[0]}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    FAILURES.append(f"{what}: the stopped rank is left behind (state {state})")
                    os.kill(victims[0], signal.SIGKILL)
        first = next((t - failed for t, code in errors), None)
        codes = {str(code) for _, code in errors}
        if first is None or codes - {"StatusCode.UNAVAILABLE"}:
            FAILURES.append(f"{what}: calls ended {codes}, not UNAVAILABLE")
        print(f"{what}, rank {ranks - 1}: first UNAVAILABLE after "
              f"{-1 if first is None else first:.2f} s, the job exited {code} after "
              f"{exited:.2f} s")
        # No corrupt checkpoint: a new job restores the newest one on every rank.
        files = sorted(os.listdir(os.path.join(data_dir, "mlp")))
        job = Job(ranks, transport, data_dir=data_dir, extra=flags)
        try:
            step = job.client.get_model("mlp").step
            if step < 10 or step % 5 != 0:
                FAILURES.append(f"after {what}: restored step {step} (files {files})")
            sj.replicas_agree(job.client, f"restored after {what}", ranks)
            job.client.train_step("mlp", x, labels=y)
            if "moved" in job.log() and "corrupt" in job.log():
                FAILURES.append(f"after {what}: a checkpoint was set aside as corrupt")
            print(f"restored step {step} from {files}")
        finally:
            job.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ranks, transport = int(sys.argv[1]), sys.argv[2]
    mismatch(ranks, transport)
    stop_and_restart(ranks, transport)
    fail_worker(ranks, transport, "kill")
    fail_worker(ranks, transport, "stop")
    for kind in sorted(sj.WORST):
        print(f"largest relative error, {kind}: {sj.WORST[kind]:.3g}")
    if FAILURES:
        print("FAILED:\n  " + "\n  ".join(FAILURES))
        return 1
    print(f"OK: start-up check, stop and restart, kill -9 of a worker, a stopped worker "
          f"({ranks} ranks, {transport})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
