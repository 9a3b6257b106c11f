"""The version pins, read from their one home: `requirements.txt` (CPU / CUDA: CI, `make demo`, `make test`;
its first line is torch, which `make setup` installs first and alone) and `requirements-gaudi.txt` (the
Habana image and the Gaudi twin; torch and DeepSpeed come from the image and HabanaAI/DeepSpeed, so neither is
listed). `launch doctor` and the tests read the pins here; nothing restates them."""

from __future__ import annotations

import re
from pathlib import Path

from dpo_dist.util.paths import REPO_ROOT

CPU_REQUIREMENTS = REPO_ROOT / "requirements.txt"
GAUDI_REQUIREMENTS = REPO_ROOT / "requirements-gaudi.txt"
# The packages `doctor` checks in each environment: the ones whose APIs dpo-dist is written against.
CPU_CHECKED = ("torch", "transformers", "accelerate", "trl", "peft", "datasets", "deepspeed")
GAUDI_CHECKED = ("optimum-habana", "transformers", "accelerate", "trl", "peft")

_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str | Path) -> dict[str, str]:
    """{normalised name: specifier} from a requirements file; comments and pip options are skipped.
    A name listed twice, or a line that is not a requirement, is an error naming the line."""
    path = Path(path)
    out: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{path.name}:{lineno}: cannot read {raw!r} as a requirement")
        name = normalise(m.group(1))
        if name in out:
            raise ValueError(f"{path.name}:{lineno}: {name} is listed twice")
        out[name] = m.group(3).replace(" ", "")
    return out


def exact_pins(path: str | Path) -> dict[str, str]:
    """{name: version} of the requirements pinned with `==`."""
    return {n: s[2:] for n, s in read_requirements(path).items() if s.startswith("==") and "," not in s}


def checked_pins(gaudi: bool) -> dict[str, str]:
    """{name: pinned version} of the packages `doctor` checks for one environment."""
    pins = exact_pins(GAUDI_REQUIREMENTS if gaudi else CPU_REQUIREMENTS)
    names = GAUDI_CHECKED if gaudi else CPU_CHECKED
    missing = [n for n in names if n not in pins]
    if missing:
        raise ValueError(f"{'requirements-gaudi.txt' if gaudi else 'requirements.txt'} pins no exact version of "
                         f"{', '.join(missing)}")
    return {n: pins[n] for n in names}
