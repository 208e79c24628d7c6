#!/usr/bin/python3
"""Static checks of the shipped deploy files (no normd binary needed):

- promtool: `check config` on prometheus.yml, `check rules` on alerts.yml, and the rule unit
  tests `test rules alerts_test.yml`, which must hold a firing and a quiet case per alert;
- the input-drift alert is the contract's eval-mode mean over a 5-minute window, per model
  and layer, and says which model and layer;
- the Grafana dashboard: valid panels, every contract metric charted, datasource and file
  paths matching the provisioning and compose files;
- compose.yaml validates (docker-compose) and wires normd, Prometheus and Grafana together;
- the Kubernetes manifests: StatefulSet with a volume claim on the data directory, gRPC
  probes and Service ports on the configured ports, the restrictive security context,
  resources, Prometheus annotations on the metrics port, the image's numeric user;
- the data-parallel job's manifests (deploy/k8s/mpi, an MPIJob): `kubectl kustomize` renders
  them; rank 0 (the launcher) has the ports, probes, data volume and annotations the
  configuration names, the Service reaches it alone, workers open only their sshd's port,
  -np = ranks;
- the job's SSH (deploy/ssh, installed by the Dockerfile): the workers' command line names the
  image's sshd configuration, whose port is above 1024 and is the one the workers' manifest
  declares and probes and the launcher's ssh client dials; keys are read from the operator's
  mount (sshAuthMountPath), and the port is not left to OMPI_MCA_plm_rsh_args, which the
  operator overrides.
"""

import json
import os
import re
import shutil
import subprocess
import unittest

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(REPO, "deploy")
PROM = os.path.join(DEPLOY, "prometheus")

# The metric names of the server contract (issue "server", section Metrics).
CONTRACT_METRICS = [
    "normd_rpc_duration_seconds", "normd_rpcs_total", "normd_samples_total",
    "normd_train_steps_total", "normd_train_loss", "normd_models", "normd_bn_mean_shift",
    "normd_bn_var_log_ratio", "normd_bn_running_mean_update_norm",
    "normd_bn_running_var_update_norm", "normd_bn_batches_tracked", "normd_build_info",
    "normd_nonfinite_steps_total", "process_resident_memory_bytes",
    "process_cpu_seconds_total", "process_start_time_seconds", "normd_tenant_requests_total",
    "normd_tenant_samples_total", "normd_tenant_refused_total",
]


def load_yaml(*parts):
    with open(os.path.join(DEPLOY, *parts)) as f:
        return yaml.safe_load(f)


def load_yaml_all(*parts):
    with open(os.path.join(DEPLOY, *parts)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def dockerfile_env():
    """NORMD_* variables set by ENV in deploy/Dockerfile."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            env.update(re.findall(r"(NORMD_[A-Z0-9_]+)=(\S+)", line))
    return env


def dockerfile_copies():
    """{source: destination} of deploy/Dockerfile's COPY instructions from the build context."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    copies = {}
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            for src in words[1:-1]:
                copies[src] = words[-1]
    return copies


def ssh_settings(name, host_block=None):
    """deploy/ssh/<name> as {keyword (lower case): [values of each occurrence]}; for a client
    configuration, the settings inside `Host <host_block>`."""
    settings, host = {}, None
    with open(os.path.join(DEPLOY, "ssh", name)) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            key, values = words[0].lower(), words[1:]
            if key == "host":
                host = " ".join(values)
                continue
            if host_block is None or host == host_block:
                settings.setdefault(key, []).append(" ".join(values))
    return settings


def promtool(*args, cwd=PROM):
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True)


class PrometheusFilesTest(unittest.TestCase):

    def test_check_config(self):
        r = promtool("check", "config", "prometheus.yml")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_check_rules(self):
        r = promtool("check", "rules", "alerts.yml")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_rule_unit_tests(self):
        r = promtool("test", "rules", "alerts_test.yml")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_each_alert_has_firing_and_quiet_cases(self):
        alerts = {rule["alert"] for g in load_yaml("prometheus", "alerts.yml")["groups"]
                  for rule in g["rules"] if "alert" in rule}
        self.assertTrue({"NormdDown", "NormdHighRpcErrorRatio", "NormdInputDrift"} <= alerts)
        cases = load_yaml("prometheus", "alerts_test.yml")["tests"]
        firing, quiet = set(), set()
        for case in cases:
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
        self.assertEqual(alerts - firing, set(), "alerts without a firing test case")
        self.assertEqual(alerts - quiet, set(), "alerts without a not-firing test case")

    def test_input_drift_rule(self):
        rules = {r["alert"]: r for g in load_yaml("prometheus", "alerts.yml")["groups"]
                 for r in g["rules"] if "alert" in r}
        drift = rules["NormdInputDrift"]
        expr = " ".join(drift["expr"].split())
        self.assertIn('rate(normd_bn_mean_shift_sum{mode="eval"}[5m])', expr)
        self.assertIn('rate(normd_bn_mean_shift_count{mode="eval"}[5m])', expr)
        for by in re.findall(r"by \(([^)]*)\)", expr):
            self.assertTrue({"tenant", "model", "layer"} <= {s.strip() for s in by.split(",")}, by)
        self.assertRegex(drift["for"], r"^\d+m$")
        summary = drift["annotations"]["summary"]
        self.assertIn("{{ $labels.tenant }}/{{ $labels.model }}", summary)
        self.assertIn("{{ $labels.layer }}", summary)
        self.assertIn("reset-stats", drift["annotations"]["description"])

    def test_rule_files_resolve(self):
        config = load_yaml("prometheus", "prometheus.yml")
        for f in config["rule_files"]:
            self.assertTrue(os.path.exists(os.path.join(PROM, f)), f)
        jobs = [j["job_name"] for j in config["scrape_configs"]]
        self.assertIn("normd", jobs)


class DashboardTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        with open(os.path.join(DEPLOY, "grafana", "dashboards", "normd.json")) as f:
            cls.dash = json.load(f)
        cls.panels = [p for p in cls.dash["panels"] if p["type"] != "row"]
        cls.exprs = [t["expr"] for p in cls.panels for t in p.get("targets", [])]

    def test_panels_are_well_formed(self):
        ids = [p["id"] for p in self.dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "duplicate panel ids")
        for p in self.panels:
            self.assertTrue(p.get("title"), p)
            self.assertTrue(p.get("targets"), f"panel {p['title']} has no queries")
            self.assertEqual(p["datasource"]["uid"], "${datasource}", p["title"])
            g = p["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24, p["title"])
            refs = [t["refId"] for t in p["targets"]]
            self.assertEqual(len(refs), len(set(refs)), p["title"])

    def test_every_contract_metric_is_charted(self):
        text = "\n".join(self.exprs)
        missing = [m for m in CONTRACT_METRICS if not re.search(r"\b%s(_sum|_count|_bucket)?\b" % m, text)]
        self.assertEqual(missing, [])

    def test_required_views(self):
        text = "\n".join(self.exprs)
        for q in ("0.50", "0.95", "0.99"):
            self.assertIn(f"histogram_quantile({q}, sum by (method, le)", text)
        self.assertIn("sum by (tenant, model, op) (rate(normd_samples_total", text)
        self.assertIn('code!="OK"', text)
        for mode in ("eval", "train"):
            self.assertIn('normd_bn_mean_shift_sum{job=~"$job", instance=~"$instance", '
                          f'tenant=~"$tenant", model=~"$model", mode="{mode}"}}', text)
        # Two tenants' models of the same id are never summed together.
        for by in re.findall(r"by \(([^)]*)\)", text):
            if "model" in by:
                self.assertIn("tenant", by)

    def test_datasource_matches_provisioning(self):
        ds = load_yaml("grafana", "provisioning", "datasources", "prometheus.yaml")["datasources"]
        uids = {d["uid"] for d in ds}
        var = [v for v in self.dash["templating"]["list"] if v["name"] == "datasource"][0]
        self.assertIn(var["current"]["value"], uids)
        compose = load_yaml("compose.yaml")
        self.assertTrue(any(d["url"] == "http://prometheus:9090" for d in ds))
        self.assertIn("prometheus", compose["services"])

    def test_dashboard_provider_path_is_mounted(self):
        provider = load_yaml("grafana", "provisioning", "dashboards", "normd.yaml")["providers"][0]
        mounts = load_yaml("compose.yaml")["services"]["grafana"]["volumes"]
        self.assertIn("./grafana/dashboards:%s:ro" % provider["options"]["path"], mounts)
        self.assertIn("./grafana/provisioning:/etc/grafana/provisioning:ro", mounts)


class ComposeTest(unittest.TestCase):

    def test_compose_validates(self):
        tool = shutil.which("docker-compose")
        self.assertIsNotNone(tool, "docker-compose (Debian package) is needed: make deps")
        r = subprocess.run([tool, "-f", "compose.yaml", "config", "-q"], cwd=DEPLOY,
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_stack_is_wired(self):
        compose = load_yaml("compose.yaml")
        normd = compose["services"]["normd"]
        self.assertEqual(normd["build"]["dockerfile"], "deploy/Dockerfile")
        self.assertTrue(os.path.exists(os.path.join(DEPLOY, normd["build"]["context"],
                                                    normd["build"]["dockerfile"])))
        env = dict(dockerfile_env(), **normd.get("environment", {}))
        data_mounts = [v for v in normd["volumes"] if v.endswith(":" + env["NORMD_DATA_DIR"])]
        self.assertEqual(len(data_mounts), 1, "the data dir must be a volume")
        self.assertIn(data_mounts[0].split(":")[0], compose["volumes"], "named volume")
        target = load_yaml("prometheus", "prometheus.yml")["scrape_configs"][0]
        self.assertEqual(target["static_configs"][0]["targets"],
                         ["normd:%d" % port_of(env["NORMD_METRICS"])])
        prom_mounts = compose["services"]["prometheus"]["volumes"]
        self.assertIn("./prometheus:/etc/prometheus:ro", prom_mounts)


class KubernetesTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        kustomization = load_yaml("k8s", "kustomization.yaml")
        cls.docs = []
        for f in kustomization["resources"]:
            cls.docs += load_yaml_all("k8s", f)
        cls.by_kind = {}
        for d in cls.docs:
            cls.by_kind.setdefault(d["kind"], []).append(d)
        cls.sts = cls.by_kind["StatefulSet"][0]
        cls.pod = cls.sts["spec"]["template"]["spec"]
        cls.ctr = cls.pod["containers"][0]
        config = {c["metadata"]["name"]: c["data"] for c in cls.by_kind["ConfigMap"]}
        cls.env = {}
        for src in cls.ctr.get("envFrom", []):
            cls.env.update(config[src["configMapRef"]["name"]])
        cls.env.update({e["name"]: e["value"] for e in cls.ctr.get("env", []) if "value" in e})

    def test_objects(self):
        for d in self.docs:
            self.assertIn("apiVersion", d)
            self.assertTrue(d["metadata"]["name"])
        self.assertEqual({"StatefulSet", "Service", "ConfigMap"}, set(self.by_kind))

    def test_data_dir_on_a_claim(self):
        claims = {c["metadata"]["name"] for c in self.sts["spec"]["volumeClaimTemplates"]}
        mounts = {m["mountPath"]: m["name"] for m in self.ctr["volumeMounts"]}
        self.assertIn(self.env["NORMD_DATA_DIR"], mounts)
        self.assertIn(mounts[self.env["NORMD_DATA_DIR"]], claims)

    def test_probes_use_grpc_health_on_the_listen_port(self):
        grpc_port = port_of(self.env["NORMD_LISTEN"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            self.assertEqual(self.ctr[probe]["grpc"]["port"], grpc_port, probe)
        self.assertTrue(self.env["NORMD_LISTEN"].startswith("0.0.0.0:"),
                        "the kubelet and Service reach the pod IP, not loopback")

    def test_ports_and_services(self):
        ports = {p["name"]: p["containerPort"] for p in self.ctr["ports"]}
        self.assertEqual(ports["grpc"], port_of(self.env["NORMD_LISTEN"]))
        self.assertEqual(ports["metrics"], port_of(self.env["NORMD_METRICS"]))
        labels = self.sts["spec"]["template"]["metadata"]["labels"]
        self.assertEqual(self.sts["spec"]["selector"]["matchLabels"].items() - labels.items(),
                         set())
        names = {s["metadata"]["name"] for s in self.by_kind["Service"]}
        self.assertIn(self.sts["spec"]["serviceName"], names)
        for svc in self.by_kind["Service"]:
            self.assertEqual(svc["spec"]["selector"].items() - labels.items(), set())
            for p in svc["spec"]["ports"]:
                self.assertIn(p["targetPort"], ports, svc["metadata"]["name"])
        main = [s for s in self.by_kind["Service"] if s["metadata"]["name"] == "normd"][0]
        self.assertEqual({p["name"] for p in main["spec"]["ports"]}, {"grpc", "metrics"})

    def test_prometheus_annotations(self):
        ann = self.sts["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(ann["prometheus.io/scrape"], "true")
        self.assertEqual(int(ann["prometheus.io/port"]), port_of(self.env["NORMD_METRICS"]))
        self.assertEqual(ann["prometheus.io/path"], "/metrics")

    def test_security_context(self):
        sc = self.ctr["securityContext"]
        self.assertIs(sc["runAsNonRoot"], True)
        self.assertIs(sc["readOnlyRootFilesystem"], True)
        self.assertIs(sc["allowPrivilegeEscalation"], False)
        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
        self.assertNotIn("add", sc["capabilities"])
        # The pod's uid is the image's numeric USER (runAsNonRoot needs it numeric).
        with open(os.path.join(DEPLOY, "Dockerfile")) as f:
            user = re.findall(r"^USER\s+(\d+):(\d+)", f.read(), re.M)
        self.assertEqual(len(user), 1)
        self.assertEqual(self.pod["securityContext"]["runAsUser"], int(user[0][0]))
        self.assertEqual(self.pod["securityContext"]["fsGroup"], int(user[0][1]))

    def test_resources(self):
        res = self.ctr["resources"]
        for kind in ("requests", "limits"):
            self.assertIn("cpu", res[kind])
            self.assertIn("memory", res[kind])
        # Compute threads should not exceed the CPU limit (no oversubscription).
        if "NORMD_COMPUTE_THREADS" in self.env:
            self.assertLessEqual(int(self.env["NORMD_COMPUTE_THREADS"]),
                                 int(float(res["limits"]["cpu"])))


class MpiJobTest(unittest.TestCase):
    """deploy/k8s/mpi: normd as a data-parallel job under the Kubeflow MPI Operator."""

    @classmethod
    def setUpClass(cls):
        kustomization = load_yaml("k8s", "mpi", "kustomization.yaml")
        cls.docs = []
        for f in kustomization["resources"]:
            cls.docs += load_yaml_all("k8s", "mpi", f)
        cls.by_kind = {}
        for d in cls.docs:
            cls.by_kind.setdefault(d["kind"], []).append(d)
        cls.job = cls.by_kind["MPIJob"][0]
        specs = cls.job["spec"]["mpiReplicaSpecs"]
        cls.launcher = specs["Launcher"]["template"]
        cls.worker = specs["Worker"]
        cls.ctr = cls.launcher["spec"]["containers"][0]
        config = {c["metadata"]["name"]: c["data"] for c in cls.by_kind["ConfigMap"]}
        cls.env = {}
        for src in cls.ctr.get("envFrom", []):
            cls.env.update(config[src["configMapRef"]["name"]])

    def test_kustomize_renders(self):
        if shutil.which("kubectl") is None:
            self.skipTest("kubectl is not installed")
        r = subprocess.run(["kubectl", "kustomize", os.path.join(DEPLOY, "k8s", "mpi")],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        kinds = {d["kind"] for d in yaml.safe_load_all(r.stdout) if d}
        self.assertEqual(kinds, {"MPIJob", "Service", "ConfigMap", "PersistentVolumeClaim"})

    def test_job(self):
        self.assertEqual(self.job["apiVersion"], "kubeflow.org/v2beta1")
        self.assertIs(self.job["spec"]["runLauncherAsWorker"], True, "the launcher is rank 0")
        self.assertEqual(self.job["spec"]["mpiImplementation"], "OpenMPI")
        args = self.ctr["args"]
        ranks = int(args[args.index("-np") + 1])
        self.assertEqual(ranks, self.worker["replicas"] + 1, "-np = workers + the launcher")
        self.assertEqual(self.ctr["command"], ["/usr/local/bin/normd-mpirun"],
                         "SIGTERM must reach normd as the forwarded SIGUSR1")
        self.assertEqual(args[-1], "/usr/local/bin/normd")
        # Every NORMD_* setting reaches the other ranks (they must agree at start-up).
        exported = {args[i + 1] for i, a in enumerate(args) if a == "-x"}
        self.assertEqual({k for k in self.env if k.startswith("NORMD_")} - exported, set())

    def test_rank0_ports_probes_volume(self):
        ports = {p["name"]: p["containerPort"] for p in self.ctr["ports"]}
        self.assertEqual(ports["grpc"], port_of(self.env["NORMD_LISTEN"]))
        self.assertEqual(ports["metrics"], port_of(self.env["NORMD_METRICS"]))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            self.assertEqual(self.ctr[probe]["grpc"]["port"], ports["grpc"], probe)
        mounts = {m["mountPath"]: m["name"] for m in self.ctr["volumeMounts"]}
        volumes = {v["name"]: v for v in self.launcher["spec"]["volumes"]}
        claim = volumes[mounts[self.env["NORMD_DATA_DIR"]]]["persistentVolumeClaim"]["claimName"]
        self.assertIn(claim, {c["metadata"]["name"] for c in self.by_kind["PersistentVolumeClaim"]})
        ann = self.launcher["metadata"]["annotations"]
        self.assertEqual(int(ann["prometheus.io/port"]), ports["metrics"])

    def test_service_reaches_rank0_only(self):
        svc = self.by_kind["Service"][0]
        labels = self.launcher["metadata"]["labels"]
        selector = dict(svc["spec"]["selector"])
        self.assertEqual(selector.pop("training.kubeflow.org/job-role"), "launcher")
        self.assertEqual(selector.items() - labels.items(), set())
        ports = {p["name"] for p in self.ctr["ports"]}
        self.assertEqual({p["targetPort"] for p in svc["spec"]["ports"]}, ports)

    def test_workers_open_sshd_only_and_match_rank0(self):
        w = self.worker["template"]["spec"]["containers"][0]
        self.assertEqual([p["name"] for p in w["ports"]], ["ssh"], "the rank opens no port")
        self.assertFalse({"livenessProbe", "readinessProbe"} & set(w))
        self.assertEqual(w["envFrom"], self.ctr["envFrom"], "the same settings on every rank")
        self.assertEqual(w["image"], self.ctr["image"], "the same build on every rank")
        self.assertEqual(self.worker["template"]["spec"]["securityContext"]["runAsUser"],
                         self.launcher["spec"]["securityContext"]["runAsUser"])


class MpiJobSshTest(unittest.TestCase):
    """The MPIJob's SSH, both ends: the workers' unprivileged sshd and the launcher's ssh client
    (mpirun's rsh launcher), against the configuration files the image carries (deploy/ssh)."""

    @classmethod
    def setUpClass(cls):
        docs = []
        for f in ("mpijob.yaml", "configmap.yaml"):
            docs += load_yaml_all("k8s", "mpi", f)
        cls.job = next(d for d in docs if d["kind"] == "MPIJob")
        cls.config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
        specs = cls.job["spec"]["mpiReplicaSpecs"]
        cls.launcher_pod = specs["Launcher"]["template"]["spec"]
        cls.worker_pod = specs["Worker"]["template"]["spec"]
        cls.worker = cls.worker_pod["containers"][0]
        cls.mount = cls.job["spec"]["sshAuthMountPath"]
        cls.sshd = ssh_settings("sshd_config")
        cls.client = ssh_settings("ssh_config", host_block="*")
        cls.copies = dockerfile_copies()
        with open(os.path.join(DEPLOY, "Dockerfile")) as f:  # instructions, no comments
            cls.dockerfile = "".join(line for line in f if not line.lstrip().startswith("#"))
        cls.dockerfile = cls.dockerfile.replace("\\\n", " ")

    def one(self, settings, key):
        self.assertIn(key, settings)
        self.assertEqual(len(settings[key]), 1, f"{key} set more than once")
        return settings[key][0]

    def test_worker_runs_the_images_sshd_config(self):
        argv = self.worker["command"] + self.worker.get("args", [])
        self.assertEqual(argv[0], "/usr/sbin/sshd")
        self.assertIn("-D", "".join(a for a in argv[1:] if a.startswith("-") and a != "-f"),
                      "sshd must stay in the foreground as the container's process")
        config_path = argv[argv.index("-f") + 1]
        self.assertEqual(self.copies.get("deploy/ssh/sshd_config"), config_path,
                         "the manifest's sshd -f path is where the Dockerfile installs the config")

    def test_launcher_ssh_client_config_is_installed_where_debian_includes_it(self):
        dest = self.copies.get("deploy/ssh/ssh_config", "")
        self.assertRegex(dest, r"^/etc/ssh/ssh_config\.d/[^/]+\.conf$")

    def test_one_port_above_1024_everywhere(self):
        port = int(self.one(self.sshd, "port"))
        self.assertGreater(port, 1024, "the sshd runs unprivileged, with no capabilities")
        self.assertEqual(int(self.one(self.client, "port")), port,
                         "the launcher's ssh client dials the workers' sshd port")
        ports = {p["name"]: p["containerPort"] for p in self.worker["ports"]}
        self.assertEqual(ports["ssh"], port, "the worker's declared ssh port")
        probe = self.worker["startupProbe"]["tcpSocket"]["port"]
        self.assertEqual(ports.get(probe, probe), port, "the worker's startup probe")

    def test_port_is_not_left_to_plm_rsh_args(self):
        # The operator appends OMPI_MCA_plm_rsh_args to the launcher's env, overriding ours.
        env = dict(self.config)
        for c in self.launcher_pod["containers"]:
            env.update({e["name"]: e.get("value") for e in c.get("env", [])})
        self.assertNotIn("OMPI_MCA_plm_rsh_args", env)
        args = self.launcher_pod["containers"][0]["args"]
        self.assertNotIn("plm_rsh_args", args)

    def test_keys_come_from_the_operators_mount(self):
        # The operator's Secret volume: id_rsa (private), id_rsa.pub, authorized_keys.
        mount = self.mount.rstrip("/")
        self.assertEqual(self.one(self.sshd, "hostkey"), f"{mount}/id_rsa",
                         "the job's key, readable by the unprivileged sshd, is its host key")
        self.assertEqual(self.one(self.sshd, "authorizedkeysfile"), f"{mount}/authorized_keys")
        self.assertEqual(self.one(self.client, "identityfile"), f"{mount}/id_rsa")
        # Root-owned 0644 files in a read-only mount: no strict modes, no known_hosts writes.
        self.assertEqual(self.one(self.sshd, "strictmodes"), "no")
        self.assertEqual(self.one(self.client, "userknownhostsfile"), "/dev/null")
        self.assertEqual(self.one(self.client, "stricthostkeychecking"), "no")

    def test_sshd_writes_nothing_to_the_read_only_root(self):
        self.assertTrue(self.worker["securityContext"]["readOnlyRootFilesystem"])
        self.assertEqual(self.one(self.sshd, "pidfile"), "none")
        self.assertRegex(self.dockerfile, r"rm -f /etc/ssh/ssh_host_\*",
                         "the package's generated host keys must not ship in the image")

    def test_the_images_user_may_log_in_with_the_job_key(self):
        m = re.search(r"useradd ([^&\n]*)", self.dockerfile)
        self.assertIsNotNone(m, "the Dockerfile's useradd")
        *opts, name = m.group(1).split()
        self.assertEqual(name, "normd")
        opts = " ".join(opts)
        uid = int(re.search(r"--uid (\d+)", opts).group(1))
        self.assertEqual(self.worker_pod["securityContext"]["runAsUser"], uid)
        self.assertEqual(self.launcher_pod["securityContext"]["runAsUser"], uid)
        self.assertEqual(self.one(self.sshd, "allowusers"), "normd")
        shell = re.search(r"--shell (\S+)", opts).group(1)
        self.assertNotIn("nologin", shell, "sshd runs mpirun's orted through the user's shell")
        self.assertEqual(self.one(self.sshd, "passwordauthentication"), "no")
        self.assertEqual(self.one(self.sshd, "permitrootlogin"), "no")
        self.assertRegex(self.dockerfile, r"openmpi-bin openssh-client openssh-server")


if __name__ == "__main__":
    unittest.main(verbosity=2)
