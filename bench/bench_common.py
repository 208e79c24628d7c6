"""Helpers shared by the speed benchmarks that drive normd and PyTorch side by side
(compare_torch.py, cnn_bench.py) and normd's data-parallel jobs (dp_bench.py).

  child_env()        the environment of every measured process, normd's and PyTorch's alike
  run_json(cmd)      runs a benchmark binary or worker and parses the JSON it prints
  torch_env(threads) child_env() with PyTorch's thread count set before torch is imported
  Server             the real normd binary (or an mpirun job of it) on free loopback ports (RSS,
                     CPU time, /metrics, the ranks' pids, stop)
  pinned(cpus)       a taskset prefix
  use_python_client(build_dir)   puts the Python client (`import normd`) on sys.path
  process_cpu_seconds(pid), runqueue_wait_seconds(pid), descendants(pid), cpus_allowed(pid)
                     a process's CPU time, time waiting for a CPU, descendants and CPU
                     affinity, from /proc
  machine_summary()  lscpu's model, CPU count and caches, and the load average
  Targets            the "target / value / goal / met" table the scripts end with
"""

import json
import os
import signal
import socket
import subprocess
import time

from normd_process import speed_env


def child_env():
    """The environment of every measured process, normd's and PyTorch's alike: without
    OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (this machine's environment sets them; OpenBLAS,
    which both use for matrix products, then picks the CPU's best kernels as on a fresh
    machine) and without NORMD_* settings."""
    return speed_env()


def torch_env(threads):
    """child_env() for a PyTorch worker at `threads` threads (OpenMP, OpenBLAS and MKL)."""
    env = child_env()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_json(cmd, env=None, timeout=300):
    import json

    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env if env is not None else child_env(), timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout)


def use_python_client(build_dir):
    """Makes `import normd` find the Python client: its sources and build_dir's generated
    protobuf modules."""
    import sys

    sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client",
                                 "python"),
                    os.path.join(os.path.abspath(build_dir), "client", "python")]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu_seconds(pid):
    """User + system CPU time process `pid` has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def runqueue_wait_seconds(pid):
    """Seconds the threads of process `pid` have spent runnable but waiting for a CPU, summed
    (/proc/PID/task/TID/schedstat; threads that ended are not counted)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def descendants(pid):
    """Every live descendant of process `pid` (children first)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def cpus_allowed(pid):
    """The Cpus_allowed_list of process `pid` ("0", "0-1", ...), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def pinned(cpus):
    """The command prefix that runs a process on the CPU list `cpus` (none when None)."""
    return ["taskset", "-c", cpus] if cpus else []


class Server:
    """The real normd binary on a free loopback port, stopped on exit. With `launcher` (a
    command prefix such as deploy/normd-mpirun -np 2 ...) it is a data-parallel job whose rank
    0 serves the ports."""

    def __init__(self, binary, threads, workdir, cpus=None, name=None, launcher=None):
        """cpus: a taskset CPU list to pin the whole server to (its compute budget then
        follows: normd counts the cores it may run on). name: tells this server's log and data
        directory from others' in workdir (default: from threads and cpus). launcher: run
        the server under this command prefix (after the taskset one, if any)."""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_address = f"127.0.0.1:{free_port()}"
        if name is None:
            name = f"{threads}-{cpus}" if cpus else str(threads)
        self.log = open(os.path.join(workdir, f"normd-{name}.log"), "w")
        data_dir = os.path.join(workdir, f"data-{name}")
        os.makedirs(data_dir, exist_ok=True)
        self.proc = subprocess.Popen(
            pinned(cpus) + list(launcher or []) + [
                binary, "--listen", self.address, "--metrics", self.metrics_address,
                "--data-dir", data_dir, "--compute-threads", str(threads), "--log-level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT, env=child_env(),
            start_new_session=launcher is not None)
        self.group = launcher is not None  # stop() may kill the job's whole process group

    def wait_ready(self, load_binary, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"normd exited early (code {self.proc.returncode}); "
                                   f"see {self.log.name}")
            res = subprocess.run([load_binary, "--address", self.address, "--scenario", "ping"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=child_env())
            if res.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("normd did not become ready")

    def cpu_seconds(self):
        """User + system CPU time the server has used so far."""
        return process_cpu_seconds(self.proc.pid)

    def rank_pids(self):
        """The pids of the normd processes this server runs, by MPI rank (one, rank 0, without
        a launcher)."""
        if self.proc.poll() is not None:
            return {}
        ranks = {}
        for pid in [self.proc.pid] + descendants(self.proc.pid):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() != "normd":
                        continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            ranks[int(env.get(b"OMPI_COMM_WORLD_RANK", b"0"))] = pid
        return ranks

    def metrics(self):
        """The unlabelled series of rank 0's /metrics, {name: value}."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                out[name] = float(value.split()[0])
        return out

    def rss_bytes(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                if self.group:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
                self.proc.wait()
        self.log.close()


def machine_summary():
    info = {}
    try:
        res = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True)
        for line in res.stdout.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = f.read().split()[:3]
    except OSError:
        pass
    return info


class Targets:
    """Rows of (target, this run's value, goal, verdict), printed as one table."""

    def __init__(self):
        self.rows = []

    def check(self, name, value, goal, ok, fmt="{:.2f}x"):
        """ok(value) decides met or MISSED; a value of None is "not measured"."""
        if value is None:
            self.rows.append((name, "-", goal, "not measured"))
        else:
            self.rows.append((name, fmt.format(value), goal, "met" if ok(value) else "MISSED"))

    def print(self, title, width=58):
        print(f"\n{title}")
        for name, value, goal, verdict in self.rows:
            print(f"  {name:{width}} {value:>10} {goal:>16}  {verdict}")


def finish(results, t_start, json_path, print_tables):
    """Ends a benchmark run: its duration and the closing load average into `results`, the
    tables printed, and the results written to json_path when given. Returns 0 (exit status)."""
    results["duration_s"] = time.time() - t_start
    with open("/proc/loadavg") as f:
        results["machine"]["loadavg_end"] = f.read().split()[:3]
    print_tables(results)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def torch_train_step(model, opt, loss_fn, x_all, y_all, batch):
    """A PyTorch training step over consecutive batches of (x_all, y_all), wrapping around:
    returns step(), which trains on the next batch and returns its loss."""
    pos = [0]

    def step():
        if pos[0] + batch > x_all.shape[0]:
            pos[0] = 0
        xb = x_all[pos[0]:pos[0] + batch]
        yb = y_all[pos[0]:pos[0] + batch]
        pos[0] += batch
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        return loss

    return step
