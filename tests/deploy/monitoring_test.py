#!/usr/bin/python3
"""Live monitoring test: the shipped dashboard and alert rules against a real normd and a real
Prometheus, both on loopback.

Starts `normd` with two tenants (a token file; at most 2 models per tenant) and Debian's
`prometheus` (config generated from deploy/prometheus/prometheus.yml: same job and rules, loopback
target, 1 s scrape and evaluation; only the `for:` of NormdInputDrift is shortened, its
expression is the shipped one). Each tenant owns a model `trainer` that keeps training and a
model `served` that is trained then served in eval mode: the same two ids in both namespaces.
It drives training, eval and failing traffic, then checks:
  1. NormdInputDrift stays quiet on in-distribution eval traffic and fires on shifted inputs of
     team-a's `served`, naming tenant, model and layer, and never for team-b's `served` (same id,
     inputs in distribution); the time to firing is printed;
  2. the dashboard's `tenant` variable lists both tenants, and every PromQL expression of
     deploy/grafana/dashboards/normd.json returns at least one finite sample with $tenant set to
     All and to each tenant (variables resolved through Prometheus as Grafana would);
  3. with $tenant set to one tenant, no per-tenant query returns another tenant's series; with
     All, every per-model query keeps the two tenants' models of the same id apart, and each
     query of the Tenants row returns one series per tenant (the models count right);
  4. a tenant pushed over its model quota (RESOURCE_EXHAUSTED) shows on the refused-requests
     panel, and the other tenant does not;
  5. `promtool check config` and `promtool check rules` pass on the shipped files.

DataParallelMonitoringTest then starts normd as a data-parallel job of 2 ranks (deploy/normd-mpirun,
loopback, in memory; Prometheus scrapes rank 0), trains a model through gRPC for a bounded number
of steps and checks that every query of the dashboard's "Data parallel" row returns finite data:
the world size is 2, the compute and collective time and the bytes all-reduced grow, and the
scaling efficiency lies in (0, 1] and equals compute / (compute + collectives) of the time panel.
Without --mpirun it is skipped: ctest runs it as its own entry, deploy_monitoring.mpi (label
mpi, which the sanitizer stages leave out as they do every MPI job).

Usage: monitoring_test.py --normd PATH/TO/normd [--mpirun PATH/TO/normd-mpirun]
"""

import argparse
import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request

import numpy as np
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROM_DIR = os.path.join(REPO, "deploy", "prometheus")
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "dashboards", "normd.json")
DRIFT_ALERT = "NormdInputDrift"
DRIFT_FOR = "3s"  # shipped: 10m; shortened so the test stays within its time budget
TOKENS = {"team-a": "tok-a", "team-b": "tok-b"}  # tenant -> its bearer token
TENANT_MAX_MODELS = 2  # each tenant's `trainer` and `served`; a third is refused
NORMD = None  # set from the command line
MPIRUN = None  # deploy/normd-mpirun, set from the command line when MPI is configured
DP_ROW = "Data parallel"
DP_RANKS = 2
# The job trains in bursts of DP_BURST steps DP_PAUSE_S apart (so that the training spans
# several scrapes) until the row shows it, for at most DP_MAX_STEPS steps.
DP_BURST, DP_PAUSE_S, DP_MAX_STEPS = 10, 0.25, 1500


def check(condition, message="check failed"):
    """Raises AssertionError(message) unless `condition`: unlike a bare `assert`, `python -O`
    and PYTHONOPTIMIZE cannot remove it."""
    if not condition:
        raise AssertionError(message)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_stubs(out_dir):
    """Generates the Python messages and gRPC stubs from the wire contract into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    subprocess.run(
        ["protoc", "-I", os.path.join(REPO, "proto"), "--python_out=" + out_dir,
         "--grpc_python_out=" + out_dir,
         "--plugin=protoc-gen-grpc_python=" + shutil.which("grpc_python_plugin"),
         os.path.join(REPO, "proto", "normd", "v1", "normd.proto")],
        check=True)
    sys.path.insert(0, out_dir)
    from normd.v1 import normd_pb2, normd_pb2_grpc  # pylint: disable=import-outside-toplevel
    return normd_pb2, normd_pb2_grpc


class Prometheus:
    """A Prometheus HTTP API client."""

    def __init__(self, address):
        self.base = "http://" + address

    def get(self, path, **params):
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read().decode())
        if body.get("status") != "success":
            raise RuntimeError(f"{url}: {body}")
        return body["data"]

    def query(self, expr, at=None):
        """An instant query, evaluated now or at `at` (a Unix time)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("/api/v1/query", **params)
        check(data["resultType"] == "vector", data["resultType"])
        return data["result"]

    def ready(self):
        try:
            with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alerts(self, name):
        return [a for a in self.get("/api/v1/alerts")["alerts"]
                if a["labels"].get("alertname") == name]


def generated_rules(path_out):
    """Writes the shipped rules with NormdInputDrift's `for:` shortened; returns the rule."""
    with open(os.path.join(PROM_DIR, "alerts.yml")) as f:
        shipped = yaml.safe_load(f)
    rules = copy.deepcopy(shipped)
    drift = None
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == DRIFT_ALERT:
                rule["for"] = DRIFT_FOR
                drift = rule
    check(drift is not None, f"{DRIFT_ALERT} missing from alerts.yml")
    with open(path_out, "w") as f:
        yaml.safe_dump(rules, f, sort_keys=False)
    return drift


def generated_config(path_out, rules_path, target):
    """The shipped prometheus.yml with its normd job pointed at `target`, 1 s intervals."""
    with open(os.path.join(PROM_DIR, "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [rules_path]
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == "normd"]
    check(len(jobs) == 1, "prometheus.yml must have exactly one job named normd")
    jobs[0]["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = jobs
    with open(path_out, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


class Traffic:
    """Drives normd with the RPC mix a real deployment sees, as one tenant (its bearer token on
    every call)."""

    IN, HIDDEN, OUT = 16, 32, 3

    def __init__(self, pb, stub, tenant):
        self.pb, self.stub, self.tenant = pb, stub, tenant
        self.md = [("authorization", "Bearer " + TOKENS[tenant])]
        self.w_true = np.random.default_rng(7).standard_normal((self.IN, self.OUT)).astype(
            np.float32)
        self.local = threading.local()  # numpy generators are not thread-safe
        self.stop = threading.Event()
        self.eval_shift = 0.0
        self.errors = []

    def tensor(self, x):
        x = np.ascontiguousarray(x, dtype="<f4")
        return self.pb.Tensor(shape=list(x.shape), raw=x.tobytes())

    def batch(self, n, shift=0.0):
        if not hasattr(self.local, "rng"):
            self.local.rng = np.random.default_rng(threading.get_ident() % 1000003)
        x = self.local.rng.standard_normal((n, self.IN)).astype(np.float32)
        labels = np.argmax(x @ self.w_true, axis=1)
        return x + np.float32(shift), [int(v) for v in labels]

    def spec(self):
        pb = self.pb
        return pb.ModelSpec(
            input_shape=[self.IN],
            layers=[
                pb.LayerSpec(name="fc1", linear=pb.LinearSpec(in_features=self.IN,
                                                              out_features=self.HIDDEN)),
                pb.LayerSpec(name="bn1", batch_norm1d=pb.BatchNormSpec(num_features=self.HIDDEN)),
                pb.LayerSpec(name="act1", relu=pb.Empty()),
                pb.LayerSpec(name="fc2", linear=pb.LinearSpec(in_features=self.HIDDEN,
                                                              out_features=self.HIDDEN)),
                pb.LayerSpec(name="bn2", batch_norm1d=pb.BatchNormSpec(num_features=self.HIDDEN)),
                pb.LayerSpec(name="act2", relu=pb.Empty()),
                pb.LayerSpec(name="head", linear=pb.LinearSpec(in_features=self.HIDDEN,
                                                               out_features=self.OUT)),
            ],
            loss=pb.LOSS_CROSS_ENTROPY,
            optimizer=pb.OptimizerSpec(sgd=pb.SGDSpec(lr=0.05, momentum=0.9)),
            seed=1)

    def create(self, model_id):
        self.stub.CreateModel(self.pb.CreateModelRequest(id=model_id, spec=self.spec()),
                              timeout=10, metadata=self.md)

    def train_steps(self, model_id, steps, batch=64):
        loss = None
        for _ in range(steps):
            x, y = self.batch(batch)
            loss = self.stub.TrainStep(self.pb.TrainStepRequest(
                model=model_id, input=self.tensor(x), labels=y), timeout=10,
                metadata=self.md).loss
        return loss

    def every_op(self, model_id):
        """One of each: Forward+Backward+ApplyGradients, TrainStream, Evaluate, an error."""
        pb = self.pb
        x, y = self.batch(32)
        fwd = self.stub.Forward(pb.ForwardRequest(model=model_id, input=self.tensor(x),
                                                  retain_for_backward=True),
                                timeout=10, metadata=self.md)
        # The cross-entropy gradient of the returned logits, as a client-side loss would give.
        logits = np.frombuffer(fwd.output.raw, dtype="<f4").reshape(32, self.OUT)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(32), y] -= 1.0
        grad = (p / 32).astype(np.float32)
        self.stub.Backward(pb.BackwardRequest(model=model_id, forward_id=fwd.forward_id,
                                              grad_output=self.tensor(grad)),
                           timeout=10, metadata=self.md)
        self.stub.ApplyGradients(pb.ApplyGradientsRequest(model=model_id), timeout=10,
                                 metadata=self.md)
        reqs = []
        for _ in range(3):
            xb, yb = self.batch(64)
            reqs.append(pb.TrainStepRequest(model=model_id, input=self.tensor(xb), labels=yb))
        for _ in self.stub.TrainStream(iter(reqs), timeout=10, metadata=self.md):
            pass
        self.stub.Evaluate(pb.EvaluateRequest(model=model_id, input=self.tensor(x), labels=y),
                           timeout=10, metadata=self.md)
        try:
            self.stub.GetModel(pb.GetModelRequest(model="no-such-model"), timeout=10,
                               metadata=self.md)
            self.errors.append("GetModel of an unknown model succeeded")
        except Exception as e:  # grpc.RpcError
            if e.code().name != "NOT_FOUND":  # pylint: disable=no-member
                self.errors.append(f"{self.tenant} unknown model: {e}")

    def background_training(self, model_id):
        """Keeps a model training (train-mode BatchNorm series, loss, every op) until stop."""
        try:
            while not self.stop.is_set():
                self.train_steps(model_id, 5)
                self.every_op(model_id)
                time.sleep(0.05)
        except Exception as e:  # pylint: disable=broad-except
            self.errors.append(f"{self.tenant} background training: {e!r}")

    def background_eval(self, model_id):
        """Eval-mode predictions, shifted by self.eval_shift (changed by the test)."""
        try:
            while not self.stop.is_set():
                x, _ = self.batch(64, self.eval_shift)
                self.stub.Forward(self.pb.ForwardRequest(model=model_id, input=self.tensor(x)),
                                  timeout=10, metadata=self.md)
                time.sleep(0.02)
        except Exception as e:  # pylint: disable=broad-except
            self.errors.append(f"{self.tenant} background eval: {e!r}")


def regex_of(selected):
    """A multi-value variable's substitution, as Grafana's regex of the selected values (each
    escaped for the regex, then for the PromQL string literal)."""
    return "(" + "|".join(re.escape(v).replace("\\", "\\\\") for v in selected) + ")"


def resolve_variables(prom, dashboard, chosen=None):
    """Values for the dashboard's template variables, found the way Grafana finds them, in the
    dashboard's order (a variable's query sees the values of those before it). Every variable
    is "All" (the dashboard's default: all its values) except those in `chosen` (name -> one
    value, which must be among the variable's values). Returns (substitutions, the values each
    variable offered)."""
    chosen = chosen or {}
    values, options = {"datasource": "prometheus"}, {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        query = substitute(query, values)
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        check(m, f"variable {var['name']}: unsupported query {query}")
        series = prom.get("/api/v1/series", **{"match[]": m.group(1)})
        found = sorted({s[m.group(2)] for s in series if m.group(2) in s})
        check(found, f"variable ${var['name']} ({query}) has no values")
        options[var["name"]] = found
        if var["name"] in chosen:
            check(chosen[var["name"]] in found,
                  f"variable ${var['name']} ({query}) offers {found}, not {chosen[var['name']]}")
            values[var["name"]] = regex_of([chosen[var["name"]]])
        else:
            values[var["name"]] = regex_of(found)
    return values, options


def substitute(expr, values):
    expr = expr.replace("$__rate_interval", "20s").replace("$__interval", "5s")
    expr = expr.replace("$__range", "1m")
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    check("$" not in expr, f"unresolved variable in {expr}")
    return expr


def dashboard_targets(dashboard):
    """(row title, panel title, target) of every query, in the dashboard's order; a panel
    belongs to the row above it (or to a collapsed row's own `panels`)."""
    out = []

    def walk(panels, row):
        for p in panels:
            if p["type"] == "row":
                row = p["title"]
                walk(p.get("panels", []), row)
                continue
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((row, p["title"], t))

    walk(dashboard["panels"], None)
    return out


def dashboard_exprs(dashboard):
    return [(title, t["refId"], t["expr"]) for _, title, t in dashboard_targets(dashboard)]


def finite_samples(result):
    return [r for r in result if math.isfinite(float(r["value"][1]))]


class LiveTest(unittest.TestCase):
    """normd (a process or a job) and Prometheus on loopback for a test class: setUpClass calls
    the subclass's start_services; everything started is stopped in tearDownClass."""

    @classmethod
    def setUpClass(cls):
        cls.t_start = time.monotonic()
        cls.tmp = tempfile.mkdtemp(prefix="normd-monitoring-")
        cls.procs, cls.threads, cls.logs, cls.sessions = [], [], [], set()
        cls.channel, cls.traffic = None, {}
        try:
            cls.start_services()
        except BaseException:
            cls.cleanup()
            raise

    @classmethod
    def start_services(cls):
        raise NotImplementedError

    @classmethod
    def write_tokens(cls):
        token_file = os.path.join(cls.tmp, "tokens")
        with open(token_file, "w") as f:
            f.writelines(f"{token} {tenant}\n" for tenant, token in TOKENS.items())
        return token_file

    @classmethod
    def start_normd(cls, argv, env=None, session=False):
        """Starts argv (normd, or a launcher of a normd job) with --port-file appended; returns
        (grpc port, metrics port) once the port file names both. session: a process group of
        its own, killed whole if it does not stop on SIGTERM."""
        port_file = os.path.join(cls.tmp, "normd.ports")
        normd_log = open(os.path.join(cls.tmp, "normd.log"), "w")
        cls.logs.append(normd_log)
        proc = subprocess.Popen(argv + ["--port-file", port_file], stdout=normd_log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=session)
        cls.procs.append(proc)
        if session:
            cls.sessions.add(proc.pid)

        def ports():
            if not os.path.exists(port_file):
                return None
            with open(port_file) as f:
                found = dict(line.strip().split("=", 1) for line in f if "=" in line)
            return found if {"grpc", "metrics"} <= found.keys() else None

        found = cls.wait_for(ports, 60, "normd's port file")
        return int(found["grpc"]), int(found["metrics"])

    @classmethod
    def start_prometheus(cls, metrics_port):
        """Prometheus with the shipped config and rules (generated_config, generated_rules)
        scraping 127.0.0.1:metrics_port; waits until it has scraped normd."""
        cls.drift_rule = generated_rules(os.path.join(cls.tmp, "alerts.yml"))
        cls.config = os.path.join(cls.tmp, "prometheus.yml")
        generated_config(cls.config, os.path.join(cls.tmp, "alerts.yml"),
                         f"127.0.0.1:{metrics_port}")
        # Prometheus cannot bind port 0: probe a free port, and retry if another process took
        # it in between.
        for attempt in range(3):
            prom_port = free_port()
            prom_log = open(os.path.join(cls.tmp, f"prometheus-{attempt}.log"), "w")
            cls.logs.append(prom_log)
            prom = subprocess.Popen(
                ["prometheus", "--config.file=" + cls.config,
                 "--storage.tsdb.path=" + os.path.join(cls.tmp, f"tsdb-{attempt}"),
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=prom_log, stderr=subprocess.STDOUT)
            cls.prom = Prometheus(f"127.0.0.1:{prom_port}")
            deadline = time.monotonic() + 30
            while prom.poll() is None and not cls.prom.ready() and time.monotonic() < deadline:
                time.sleep(0.25)
            if prom.poll() is None:
                break
        cls.procs.append(prom)
        cls.wait_for(cls.prom.ready, 30, "Prometheus ready")
        cls.wait_for(lambda: [r for r in cls.prom.query('up{job="normd"}')
                              if r["value"][1] == "1"], 30, "normd scraped (up == 1)")

    @classmethod
    def connect(cls, grpc_port, pb_grpc):
        import grpc  # pylint: disable=import-outside-toplevel
        cls.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        grpc.channel_ready_future(cls.channel).result(timeout=30)
        stub = pb_grpc.TrainerStub(cls.channel)
        cls.traffic = {tenant: Traffic(cls.pb, stub, tenant) for tenant in TOKENS}

    @classmethod
    def tearDownClass(cls):
        cls.cleanup()

    @classmethod
    def cleanup(cls):
        for tr in cls.traffic.values():
            tr.stop.set()
        for t in cls.threads:
            t.join(timeout=15)
        if cls.channel:
            cls.channel.close()
        for p in reversed(cls.procs):
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                if p.pid in cls.sessions:
                    os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank
                else:
                    p.kill()
                p.wait()
        for log in cls.logs:
            log.close()
        if os.environ.get("KEEP_TMP"):
            print("kept", cls.tmp)
        else:
            shutil.rmtree(cls.tmp, ignore_errors=True)
        print(f"{cls.__name__} took {time.monotonic() - cls.t_start:.1f} s")

    @classmethod
    def wait_for(cls, predicate, timeout_s, what):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in cls.procs:
                if p.poll() is not None:
                    raise AssertionError(f"{p.args[0]} exited with {p.returncode} while "
                                         f"waiting for {what}; logs in {cls.tmp}")
            result = predicate()
            if result:
                return result
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

    def start(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)


class MonitoringTest(LiveTest):
    """A single-process normd (see the file comment, checks 1-5)."""

    @classmethod
    def start_services(cls):
        cls.pb, pb_grpc = generate_stubs(os.path.join(cls.tmp, "stubs"))
        # normd binds free ports itself (port 0) and reports them through --port-file.
        grpc_port, metrics_port = cls.start_normd(
            [NORMD, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
             "--data-dir", os.path.join(cls.tmp, "data"),
             "--auth-token-file", cls.write_tokens(),
             "--tenant-max-models", str(TENANT_MAX_MODELS)])
        cls.start_prometheus(metrics_port)
        cls.connect(grpc_port, pb_grpc)

    def drift_values(self, tenant, model):
        """The drift rule's own expression, without its threshold, per layer of tenant's
        `model`."""
        expr = self.drift_rule["expr"].strip()
        m = re.fullmatch(r"(.*)\)\s*>\s*[0-9.]+", expr, re.S)
        self.assertIsNotNone(m, "drift expr is not '(...) > threshold'")
        result = self.prom.query(m.group(1) + ")")
        return {r["metric"]["layer"]: float(r["value"][1]) for r in result
                if r["metric"].get("tenant") == tenant and r["metric"].get("model") == model}

    def alerts_of(self, name, tenant, model=None, state=None):
        return [a for a in self.prom.alerts(name)
                if a["labels"].get("tenant") == tenant
                and model in (None, a["labels"].get("model"))
                and state in (None, a["state"])]

    def test_dashboard_alerts_and_promtool(self):
        a, b = self.traffic["team-a"], self.traffic["team-b"]
        # Each tenant: a model that keeps training for the whole test, and one trained then
        # served. The ids are the same in both namespaces.
        for tr in (a, b):
            tr.create("trainer")
            tr.create("served")
            self.start(tr.background_training, "trainer")
        for tr in (a, b):
            first = tr.train_steps("served", 1)
            last = tr.train_steps("served", 80)
            print(f"{tr.tenant}/served: loss {first:.3f} -> {last:.3f} after 81 steps")
            self.assertLess(last, first, "training through normd did not reduce the loss")

        # A step whose values overflow float32 is refused, counted, and alerted on.
        big = np.full((8, Traffic.IN), 3e38, dtype=np.float32)
        with self.assertRaises(Exception) as refused:
            a.stub.TrainStep(self.pb.TrainStepRequest(model="served", input=a.tensor(big),
                                                      labels=[0] * 8), timeout=10, metadata=a.md)
        self.assertEqual(refused.exception.code().name, "FAILED_PRECONDITION")

        for tr in (a, b):
            tr.stub.SetMode(self.pb.SetModeRequest(model="served", mode=self.pb.MODE_EVAL),
                            timeout=10, metadata=tr.md)
            self.start(tr.background_eval, "served")

        # In-distribution eval traffic: the drift figure stays below the threshold.
        threshold = float(re.search(r">\s*([0-9.]+)\s*$", self.drift_rule["expr"]).group(1))
        for tr in (a, b):
            self.wait_for(lambda tr=tr: len(self.drift_values(tr.tenant, "served")) == 2, 30,
                          f"eval-mode drift series for both BatchNorm layers of {tr.tenant}")
        time.sleep(5)
        for tr in (a, b):
            calm = self.drift_values(tr.tenant, "served")
            print(f"{tr.tenant}/served eval drift, in distribution:",
                  {k: round(v, 3) for k, v in calm.items()})
            for layer, value in calm.items():
                self.assertLess(value, threshold,
                                f"in-distribution traffic reads as drift ({tr.tenant} {layer})")
        self.assertEqual(self.prom.alerts(DRIFT_ALERT), [], "drift alert active without drift")

        # Team-a's inputs shift: the alert fires, naming tenant, model and layer. Team-b's
        # `served` keeps in-distribution inputs and must not alert.
        a.eval_shift = 3.0
        t_shift = time.monotonic()
        firing = self.wait_for(lambda: self.alerts_of(DRIFT_ALERT, "team-a", "served", "firing"),
                               90, f"{DRIFT_ALERT} firing for team-a/served")
        fired_s = time.monotonic() - t_shift
        print(f"{DRIFT_ALERT} firing {fired_s:.1f} s after the input shift "
              f"(rule for: {DRIFT_FOR}, scrape/eval interval 1 s): "
              + "; ".join(alert["annotations"]["summary"] for alert in firing))
        print("team-a/served eval drift, shifted:",
              {k: round(v, 3) for k, v in self.drift_values("team-a", "served").items()})
        for alert in firing:
            self.assertIn("team-a/served", alert["annotations"]["summary"])
            self.assertIn(alert["labels"]["layer"], alert["annotations"]["summary"])
            self.assertIn(alert["labels"]["layer"], ("bn1", "bn2"))
        self.wait_for(lambda: self.alerts_of("NormdNonFiniteSteps", "team-a", "served", "firing"),
                      30, "NormdNonFiniteSteps firing for team-a's refused step")
        # Team-b's models of the same ids had no drift and no refused step; the trainer models
        # are not served in eval mode: no drift alert for them.
        self.assertEqual(self.alerts_of(DRIFT_ALERT, "team-b"), [], "team-b alerted")
        self.assertEqual(self.alerts_of("NormdNonFiniteSteps", "team-b"), [], "team-b alerted")
        self.assertEqual(self.alerts_of(DRIFT_ALERT, "team-a", "trainer"), [])

        # Team-b is at its model quota: a third model is refused.
        def refused_create():
            with self.assertRaises(Exception) as over:
                b.create("extra")
            self.assertEqual(over.exception.code().name, "RESOURCE_EXHAUSTED")

        refused_create()

        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        targets = dashboard_targets(dashboard)
        exprs = dashboard_exprs(dashboard)
        self.assertGreater(len(exprs), 15)

        # The tenant variable offers both tenants; the model variable follows it.
        model_var = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
        self.assertEqual(len(model_var), 1)
        self.assertIn('tenant=~"$tenant"', model_var[0]["query"]["query"])
        all_values, options = resolve_variables(self.prom, dashboard)
        self.assertEqual(options["tenant"], ["team-a", "team-b"])
        self.assertEqual(options["model"], ["served", "trainer"])
        choices = {"All": all_values}
        for tenant in TOKENS:
            choices[tenant], options = resolve_variables(self.prom, dashboard, {"tenant": tenant})
            self.assertEqual(options["model"], ["served", "trainer"], tenant)

        # Every dashboard query returns data, with $tenant All and each tenant.
        pending = {(choice, title, ref): expr for choice in choices for title, ref, expr in exprs}
        results = {}
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            for (choice, title, ref), expr in pending.items():
                query = substitute(expr, choices[choice])
                results[(choice, title, ref)] = (query, self.prom.query(query))
            pending = {k: e for k, e in pending.items() if not finite_samples(results[k][1])}
            if pending:
                time.sleep(1)
        for key in pending:
            print(f"no finite sample: $tenant={key[0]}, panel '{key[1]}' {key[2]}: "
                  f"{results[key][0]} -> {results[key][1]}")
        self.assertEqual(list(pending), [], "dashboard queries without data")
        print(f"dashboard: {len(exprs)} queries x {len(choices)} values of $tenant, each "
              "returned finite samples")

        # One tenant selected: no per-tenant or per-model query shows another tenant's series.
        for tenant in TOKENS:
            for title, ref, expr in exprs:
                if "$tenant" not in expr and "$model" not in expr:
                    continue
                query, result = results[(tenant, title, ref)]
                leaked = [r["metric"] for r in result if r["metric"].get("tenant") != tenant]
                self.assertEqual(leaked, [], f"$tenant={tenant}: panel '{title}' {ref}: {query}")

        # All tenants: every per-model query keeps the two tenants' models of the same id
        # apart (a series per tenant and model, legend tenant/model).
        for _, title, t in targets:
            if "$model" not in t["expr"]:
                continue
            self.assertIn("{{tenant}}/{{model}}", t.get("legendFormat", ""), title)
            query, result = results[("All", title, t["refId"])]
            pairs = {(r["metric"].get("tenant"), r["metric"].get("model"))
                     for r in finite_samples(result)}
            self.assertTrue(any(("team-a", m) in pairs and ("team-b", m) in pairs
                                for _, m in pairs),
                            f"panel '{title}' {t['refId']}: no model id charted for both "
                            f"tenants: {query} -> {sorted(pairs)}")

        # The Tenants row: one series per tenant in each query; each tenant holds 2 models.
        tenant_row = [(title, t) for row, title, t in targets if row == "Tenants"]
        self.assertGreaterEqual(len(tenant_row), 4, "the Tenants row")
        for title, t in tenant_row:
            query, result = results[("All", title, t["refId"])]
            self.assertEqual(sorted(r["metric"].get("tenant") for r in finite_samples(result)),
                             ["team-a", "team-b"], f"panel '{title}': {query} -> {result}")
            if t["expr"].startswith("count by (tenant)"):
                self.assertEqual({r["metric"]["tenant"]: float(r["value"][1]) for r in result},
                                 {name: float(TENANT_MAX_MODELS) for name in TOKENS}, title)

        # Team-b's refused calls show on the refused panel, team-a's stays at 0.
        refused_expr = [t["expr"] for _, t in tenant_row
                        if "normd_tenant_refused_total" in t["expr"]]
        self.assertEqual(len(refused_expr), 1, "one refused-requests query in the Tenants row")

        def refused_rate(tenant):
            result = self.prom.query(substitute(refused_expr[0], choices[tenant]))
            return sum(float(r["value"][1]) for r in finite_samples(result))

        def team_b_refused():
            if refused_rate("team-b") > 0:
                return True
            refused_create()  # the rate window may have passed the first one: refuse again
            return False

        self.wait_for(team_b_refused, 60, "team-b's refused calls on the refused panel")
        self.assertEqual(refused_rate("team-a"), 0.0, "team-a had no call refused")
        self.assertEqual(a.errors + b.errors, [])

        # The shipped files pass promtool, and so does the generated test config.
        for args in (["check", "config", os.path.join(PROM_DIR, "prometheus.yml")],
                     ["check", "rules", os.path.join(PROM_DIR, "alerts.yml")],
                     ["check", "config", self.config]):
            r = subprocess.run(["promtool"] + args, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, f"promtool {' '.join(args)}:\n{r.stdout}{r.stderr}")


class DataParallelMonitoringTest(LiveTest):
    """normd as a data-parallel job of DP_RANKS ranks: the dashboard's "Data parallel" row."""

    @classmethod
    def start_services(cls):
        if MPIRUN is None:
            raise unittest.SkipTest("no --mpirun (ctest runs this class as deploy_monitoring.mpi)")
        cls.pb, pb_grpc = generate_stubs(os.path.join(cls.tmp, "stubs"))
        # As tests/mpi start a job: loopback only, ranks may outnumber cores; NORMD_*
        # variables would be read as flags by every rank.
        env = {k: v for k, v in os.environ.items() if not k.startswith("NORMD_")}
        env["OMPI_MCA_btl_tcp_if_include"] = "lo"
        grpc_port, metrics_port = cls.start_normd(
            [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(DP_RANKS), NORMD,
             "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--in-memory",
             "--compute-threads", "1", "--auth-token-file", cls.write_tokens()],
            env=env, session=True)
        cls.start_prometheus(metrics_port)
        cls.connect(grpc_port, pb_grpc)

    @staticmethod
    def row_problem(title, expr, result, row_results):
        """What is wrong with one query of the row once the job has trained ("" if nothing).
        row_results: (title, refId) -> (query, result) of the whole row at the same instant."""
        values = [float(r["value"][1]) for r in result]
        if not values or not all(math.isfinite(v) for v in values):
            return "no finite sample"
        if "normd_world_size" in expr:
            return "" if values == [float(DP_RANKS)] else f"world size {values}"
        if "efficiency" not in title.lower():
            return "" if all(v > 0 for v in values) else f"{values} not > 0 while training"
        if not all(0.0 < v <= 1.0 + 1e-9 for v in values):
            return f"efficiency {values} outside (0, 1]"
        # The efficiency the other panels' compute and collective series imply.
        def others(metric):
            return [float(r["value"][1]) for (t, _), (q, res) in row_results.items()
                    if t != title and metric in q for r in res]
        compute, collective = others("normd_dp_compute_seconds"), others(
            "normd_dp_collective_seconds")
        if len(compute) != 1 or len(collective) != 1:
            return f"other panels: compute {compute}, collectives {collective}"
        implied = compute[0] / (compute[0] + collective[0])
        if abs(values[0] - implied) > 1e-9:
            return f"efficiency {values[0]}, but compute / (compute + collectives) = {implied}"
        return ""

    def test_data_parallel_row(self):
        a = self.traffic["team-a"]
        a.create("trainer")
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        row = [(title, t["refId"], t["expr"]) for r, title, t in dashboard_targets(dashboard)
               if r == DP_ROW]
        for metric in ("normd_world_size", "normd_dp_compute_seconds",
                       "normd_dp_collective_seconds", "normd_dp_allreduce_bytes_total"):
            self.assertTrue(any(metric in expr for _, _, expr in row),
                            f"the {DP_ROW} row charts no {metric}")
        self.assertTrue(any("efficiency" in title.lower() for title, _, _ in row))

        # Train in bursts and look at the row between them, until every query shows what a
        # training job must (rates need two scrapes of growing counters in their window).
        first = a.train_steps("trainer", 1)
        steps, last, problems, results = 1, first, {}, {}
        values = None
        deadline = time.monotonic() + 90
        while steps < DP_MAX_STEPS and time.monotonic() < deadline:
            last = a.train_steps("trainer", DP_BURST)
            steps += DP_BURST
            time.sleep(DP_PAUSE_S)
            if values is None:
                try:  # until Prometheus has scraped the model's first series
                    values, _ = resolve_variables(self.prom, dashboard)
                except AssertionError as e:
                    problems = {("template variables", ""): str(e)}
                    continue
            at = time.time()  # one instant for the whole row, as a dashboard refresh
            results = {(title, ref): (substitute(expr, values),
                                      self.prom.query(substitute(expr, values), at))
                       for title, ref, expr in row}
            problems = {(title, ref): self.row_problem(title, query, result, results)
                        for (title, ref), (query, result) in results.items()}
            problems = {k: v for k, v in problems.items() if v}
            if not problems:
                break
        print(f"{DP_RANKS}-rank job: {steps} TrainSteps, loss {first:.3f} -> {last:.3f}")
        for (title, ref), (query, result) in sorted(results.items()):
            print(f"  {title} {ref}: {[round(float(r['value'][1]), 6) for r in result]}")
        for (title, ref), problem in problems.items():
            print(f"  {title} {ref}: {problem}: {results.get((title, ref), ('',))[0]}")
        self.assertEqual(problems, {}, f"{DP_ROW} row queries without the job's data")
        self.assertLess(last, first, "training the job did not reduce the loss")
        self.assertEqual(a.errors, [])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--normd", required=True)
    parser.add_argument("--mpirun", help="deploy/normd-mpirun (omitted: no data-parallel job)")
    args, rest = parser.parse_known_args()
    NORMD = os.path.abspath(args.normd)
    MPIRUN = os.path.abspath(args.mpirun) if args.mpirun else None
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
