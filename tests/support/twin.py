"""The Gaudi twin for tests: optimum-habana's real code on CPU, in the second venv (`make setup-gaudi-twin`).

Tests run in the main venv and start twin processes with `twin_env()`: the twin venv's bin first on PATH
(optimum-habana runs `pip list` to read the SynapseAI version), the test-only `habana_frameworks` stand-in and the
project on PYTHONPATH, and $DPO_DIST_HPU_TWIN set (dpo_dist/backend.py). `twin_skip_reason()` says why a twin test
cannot run here (and is None where it can: in CI, `make test` builds the venv first).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from tests.support.testing_utils import ROOT, cpu_env

TWIN_VENV = ROOT / ".venv-gaudi"
TWIN_PY = TWIN_VENV / "bin" / "python"
SHIM = ROOT / "tests" / "support" / "habana_shim"


def twin_env(**extra) -> dict:
    env = cpu_env(**extra)
    env["PATH"] = str(TWIN_VENV / "bin") + os.pathsep + env["PATH"]
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM), str(ROOT), env.get("PYTHONPATH", "")])
    env["DPO_DIST_HPU_TWIN"] = "1"
    env.pop("DS_ACCELERATOR", None)  # the twin runs without DeepSpeed
    return env


@functools.cache
def twin_skip_reason() -> str | None:
    if not TWIN_PY.exists():
        return f"the Gaudi twin venv is missing ({TWIN_VENV}); `make setup-gaudi-twin` builds it (`make test` does)"
    probe = subprocess.run([str(TWIN_PY), "-c", "import optimum.habana.trl, trl; assert trl.__version__ == '0.9.6'"],
                           env=twin_env(), capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"the Gaudi twin venv does not import optimum.habana.trl with trl 0.9.6: {probe.stderr.strip()[-400:]}"
    return None


def mpirun_skip_reason() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun is not installed (.ci/openmpi_setup.sh installs Debian's openmpi-bin; it could not here)"
    return None
