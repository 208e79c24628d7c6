#!/usr/bin/python3
"""The deploy files cannot drift from the code: every flag and NORMD_* environment variable that
deploy/Dockerfile, deploy/compose.yaml and deploy/k8s/ pass to normd is accepted by the real
binary, checked with `normd --check-config` (validate the configuration and exit), both as an
environment variable and as the equivalent flag, one by one and as each file's whole set.

Usage: flags_test.py --normd PATH/TO/normd
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import unittest

import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(REPO, "deploy")
NORMD = None  # set from the command line


def flag_of(env_name):
    """NORMD_MAX_MODELS -> --max-models."""
    return "--" + env_name[len("NORMD_"):].lower().replace("_", "-")


def flags_in(argv):
    """[(flag, value)] from an argument list: --a=1, --a 1, --switch."""
    out, i = [], 0
    while i < len(argv):
        a = str(argv[i])
        if a.startswith("--"):
            if "=" in a:
                out.append(tuple(a.split("=", 1)))
            elif i + 1 < len(argv) and not str(argv[i + 1]).startswith("--"):
                out.append((a, str(argv[i + 1])))
                i += 1
            else:
                out.append((a, None))
        i += 1
    return out


def from_dockerfile():
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    env, flags = {}, []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("ENV "):
            env.update(re.findall(r"(NORMD_[A-Z0-9_]+)=(\S+)", line))
        elif line.startswith(("ENTRYPOINT ", "CMD ")) and "normd" in line and "normctl" not in line:
            body = line.split(" ", 1)[1]
            argv = yaml.safe_load(body) if body.startswith("[") else shlex.split(body)
            flags += flags_in(argv)
    return env, flags


def from_compose():
    with open(os.path.join(DEPLOY, "compose.yaml")) as f:
        svc = yaml.safe_load(f)["services"]["normd"]
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    cmd = svc.get("command", [])
    argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
    return {k: str(v) for k, v in env.items() if k.startswith("NORMD_")}, flags_in(argv)


def from_k8s():
    docs = []
    k8s = os.path.join(DEPLOY, "k8s")
    for name in sorted(os.listdir(k8s)):
        if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml":
            with open(os.path.join(k8s, name)) as f:
                docs += [d for d in yaml.safe_load_all(f) if d]
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env, flags = {}, []
    for d in docs:
        if d["kind"] not in ("StatefulSet", "Deployment"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            for src in c.get("envFrom", []):
                env.update(maps[src["configMapRef"]["name"]])
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = e["value"]
            flags += flags_in(list(c.get("command", [])[1:]) + list(c.get("args", [])))
    return {k: str(v) for k, v in env.items() if k.startswith("NORMD_")}, flags


SOURCES = {"Dockerfile": from_dockerfile, "compose.yaml": from_compose, "k8s": from_k8s}


class DeployFlagsTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="normd-flags-")
        cls.help = subprocess.run([NORMD, "--help"], capture_output=True, text=True,
                                  timeout=30).stdout
        cls.settings = {name: fn() for name, fn in SOURCES.items()}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def localize(self, name, value):
        """The data directory is the one value that names host state: use a scratch one."""
        if name in ("NORMD_DATA_DIR", "--data-dir"):
            return os.path.join(self.tmp.name, "data")
        return value

    def check_config(self, flags=(), env=None):
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        r = subprocess.run([NORMD, "--check-config", *flags], env={**base, **(env or {})},
                           capture_output=True, text=True, timeout=30, cwd=self.tmp.name)
        return r.returncode, (r.stdout + r.stderr).strip()

    def test_sources_pass_settings(self):
        for name, (env, flags) in self.settings.items():
            self.assertTrue(env or flags, f"{name}: no normd settings found (parser broken?)")
        for env, _ in self.settings.values():
            self.assertIn("NORMD_LISTEN", env)

    def test_each_env_var_and_its_flag(self):
        checked = 0
        for source, (env, flags) in self.settings.items():
            for name, value in env.items():
                value = self.localize(name, value)
                with self.subTest(source=source, env=name):
                    self.assertRegex(self.help, r"\b%s\b" % name,
                                     f"`normd --help` does not document {name}")
                    rc, out = self.check_config(env={name: value})
                    self.assertEqual(rc, 0, f"{source}: {name}={value} refused: {out}")
                    # --check-config prints the effective configuration, "key=value" a line.
                    key = name[len("NORMD_"):].lower()
                    self.assertRegex(out, r"(?m)^%s=%s(s| \(auto\))?$" % (key, re.escape(value)),
                                     f"{source}: {name}={value} did not take effect")
                    rc, out = self.check_config([flag_of(name), value])
                    self.assertEqual(rc, 0, f"{source}: {flag_of(name)} {value} refused: {out}")
                    checked += 1
            for flag, value in flags:
                with self.subTest(source=source, flag=flag):
                    argv = [flag] if value is None else [flag, self.localize(flag, value)]
                    rc, out = self.check_config(argv)
                    self.assertEqual(rc, 0, f"{source}: {' '.join(argv)} refused: {out}")
                    checked += 1
        print(f"{checked} settings accepted by {NORMD} --check-config")

    def test_each_source_as_a_whole(self):
        for source, (env, flags) in self.settings.items():
            with self.subTest(source=source):
                env = {k: self.localize(k, v) for k, v in env.items()}
                argv = []
                for flag, value in flags:
                    argv += [flag] if value is None else [flag, self.localize(flag, value)]
                rc, out = self.check_config(argv, env)
                self.assertEqual(rc, 0, f"{source}: {out}")

    def test_check_config_rejects_what_it_should(self):
        # Controls: without these, a --check-config that accepts anything would pass the above.
        rc, _ = self.check_config(["--no-such-flag", "1"])
        self.assertNotEqual(rc, 0, "unknown flag accepted")
        rc, _ = self.check_config(env={"NORMD_MAX_MODELS": "many"})
        self.assertNotEqual(rc, 0, "NORMD_MAX_MODELS=many accepted: is the variable read?")
        rc, _ = self.check_config(["--max-models", "many"])
        self.assertNotEqual(rc, 0, "--max-models many accepted")
        rc, _ = self.check_config(env={"NORMD_LISTEN": "no-port-here"})
        self.assertNotEqual(rc, 0, "NORMD_LISTEN without a port accepted")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--normd", required=True)
    args, rest = parser.parse_known_args()
    NORMD = os.path.abspath(args.normd)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
