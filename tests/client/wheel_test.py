"""The installed wheel, as a new user gets it: a fresh venv made with --system-site-packages
(Debian's grpcio, protobuf, numpy, tqdm and torch), `pip install --no-index` of the wheel the
build made (NORMD_WHEEL), then wheel_check.py run by that venv's python from a directory outside
the source tree with PYTHONPATH unset, so only the installed package can be imported. The
check drives a real normd: fit() on scikit-learn digits and the rest of the client's contract.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def env_path(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set; run the test through ctest")
    return value


class WheelTest(unittest.TestCase):
    def test_installed_wheel(self):
        wheel = env_path("NORMD_WHEEL")
        self.assertTrue(os.path.isfile(wheel), f"{wheel} was not built (target normd_wheel)")
        tmp = tempfile.mkdtemp(prefix="normd-wheel-test-")
        try:
            venv = os.path.join(tmp, "venv")
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv],
                           check=True)
            python = os.path.join(venv, "bin", "python")
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
            subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-cache-dir",
                            wheel], check=True, env=env, cwd=tmp)
            # The installed metadata declares the runtime dependencies.
            requires = subprocess.run(
                [python, "-c", "import importlib.metadata as m; print(m.requires('normd'))"],
                check=True, env=env, cwd=tmp, capture_output=True, text=True).stdout
            for dependency in ("grpcio", "protobuf", "numpy", "tqdm"):
                self.assertIn(dependency, requires)
            work = os.path.join(tmp, "work")
            os.makedirs(work)
            # A copy of the check and of the server helper, so that nothing imported comes from
            # the source tree (a script's own directory is sys.path[0]).
            for name in ("wheel_check.py", "normd_server.py"):
                shutil.copy(os.path.join(HERE, name), work)
            p = subprocess.run([python, os.path.join(work, "wheel_check.py"), venv], env=env,
                               cwd=work, timeout=800)
            self.assertEqual(p.returncode, 0, "wheel_check.py failed (output above)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
