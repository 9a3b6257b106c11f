"""`python -m launch doctor`: check this machine (and a hostfile's nodes) before a launch, and
explain every problem with its fix.

    python -m launch doctor [--hardware gaudi2|gaudi3|cuda|cpu] [--cards N] [--hostfile F] [--ssh_port 22]

What it checks:

1. **Versions** of the installed packages against the pins of the environment the hardware
   needs, read with `importlib.metadata` only (nothing heavy is imported):
   - CPU / CUDA (`make setup`): the exact pins of requirements.txt for `launch.pins.CPU_CHECKED`
     (torch, transformers, accelerate, trl, peft, datasets, deepspeed);
   - Gaudi (the Dockerfile): the exact pins of requirements-gaudi.txt for `launch.pins.GAUDI_CHECKED`
     (optimum-habana, transformers, accelerate, trl, peft), DeepSpeed from HabanaAI's fork
     (`+hpu.synapse.v…`), torch as shipped by the Habana image, and the SynapseAI bridge
     (`habana-torch-plugin`) at the release optimum-habana 1.21.2 is validated with
     (its `CURRENTLY_VALIDATED_SYNAPSE_VERSION`, `VALIDATED_SYNAPSE` below).
   A missing package or a different minor version fails (the trainer APIs differ); a different
   patch release is a warning.
2. **The accelerator.** HPU: `PT_HPU_LAZY_MODE` must be `1` (SynapseAI >= 1.21 defaults to 0,
   eager mode), `PT_ENABLE_INT64_SUPPORT=1`, `habana_frameworks` importable, and the visible
   cards (`hl-smi -Q index -f csv,noheader`, `HABANA_VISIBLE_DEVICES`) against `--cards`.
   CUDA: `nvidia-smi -L` (or `torch.cuda.device_count()`, imported only then) and
   `CUDA_VISIBLE_DEVICES`. CPU: the usable cores (informational).
3. **The hostfile**: parsed with `launch.command.hostfile` (errors name the line and column), then each
   host is resolved (`socket.getaddrinfo`) and a TCP connection to its ssh port is tried with a
   short timeout. No shell ever sees a host name. Loopback hosts need no sshd (the CPU
   loopback launch uses `--no_ssh`), so an unreachable ssh port there is only a warning.
4. **Secrets**: only whether `HF_TOKEN` / a stored token exist ("set", never the value), and how
   the other nodes get theirs (the launcher never forwards it).

`run_doctor` prints the checklist and returns 0 when every required check passes, else 1.
`collect_checks` returns the checks as data (for tests and other tools).
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dpo_dist.backend import TWIN_ENV, twin_requested
from dpo_dist.util.logs import is_secret_name
from launch.cards import HL_SMI_INDEX, run_tool, visible_ids
from launch.command.hostfile import HostfileError, is_loopback, parse_hostfile
from launch.pins import checked_pins

__all__ = ["Check", "collect_checks", "render_checks", "run_doctor", "version_status"]

# The SynapseAI release optimum-habana 1.21.2 is validated with (its CURRENTLY_VALIDATED_SYNAPSE_VERSION).
VALIDATED_SYNAPSE = "1.24.*"
HARDWARE_CHOICES = ("gaudi2", "gaudi3", "hpu", "cuda", "cpu")
DEFAULT_SSH_PORT = 22
HABANA_SSH_PORT = 3022
CONNECT_TIMEOUT_S = 1.5

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
_TAGS = {OK: "[ OK ]", INFO: "[INFO]", WARN: "[WARN]", FAIL: "[FAIL]"}

_CPU_FIX = ("reinstall the pinned CPU/CUDA environment: `rm -f .venv/.installed && make setup` "
            "(torch first and alone, then `pip install -r requirements.txt`)")
_GAUDI_FIX = ("use the Gaudi image (`make build`, see the Dockerfile), or inside a Habana PyTorch image "
              "`pip install -r requirements-gaudi.txt`")


@dataclass(frozen=True)
class Check:
    section: str
    name: str
    status: str  # ok | info | warn | fail
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


# --------------------------------------------------------------------------------------------
# versions


def _release(version: str) -> tuple:
    """'2.13.0+cpu' -> (2, 13, 0); '0.16.1+hpu.synapse.v1.22.0' -> (0, 16, 1); '4.55.0rc1' -> (4, 55, 0)."""
    base = version.split("+", 1)[0]
    out = []
    for part in base.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if digits == "":
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


def version_status(installed: str | None, expected: str) -> str:
    """ok / warn (another patch release) / fail (missing, or another major.minor).

    `expected` is "X.Y.Z" (exact, local suffixes such as +cpu ignored) or "X.Y.*"."""
    if installed is None:
        return FAIL
    have = _release(installed)
    if expected.endswith(".*"):
        want = _release(expected[:-2])
        return OK if have[: len(want)] == want else FAIL
    want = _release(expected)
    if have == want or have + (0,) * (len(want) - len(have)) == want:
        return OK
    return WARN if have[:2] == want[:2] else FAIL


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:  # a broken dist-info should be reported, not crash the doctor
        return None


def _version_checks(kind: str, version_of: Callable[[str], str | None], twin: bool = False) -> list[Check]:
    sec = "versions"
    gaudi = kind == "hpu"
    pins = checked_pins(gaudi)
    env_name = "Gaudi (Dockerfile, requirements-gaudi.txt)" if gaudi else "CPU/CUDA (requirements.txt, make setup)"
    fix = _GAUDI_FIX if gaudi else _CPU_FIX
    checks = [Check(sec, "python", INFO, f"Python {platform.python_version()} ({sys.executable}); "
                                         f"pins for the {env_name} environment")]
    for dist, want in pins.items():
        have = version_of(dist)
        status = version_status(have, want)
        shown_want = want.replace(".*", ".x")
        if have is None:
            detail = f"not installed (expected {shown_want})"
        elif status == OK:
            detail = f"{have} (expected {shown_want})"
        elif status == WARN:
            detail = f"{have}, expected {shown_want}: another patch release (probably fine, but untested)"
        else:
            detail = f"{have}, expected {shown_want}: a different release, whose APIs this project was not written against"
        extra = ""
        if gaudi and dist == "trl" and status != OK:
            extra = (" optimum.habana.trl imports only with trl 0.9.6 (or 0.17.0) and GaudiDPOTrainer takes the "
                     "trl 0.9.6 keyword style.")
        checks.append(Check(sec, dist, status, detail + extra, "" if status == OK else fix))
    if gaudi:
        torch_v = version_of("torch")
        if torch_v is None:
            checks.append(Check(sec, "torch", FAIL, "not installed", "use the Habana PyTorch image (Dockerfile FROM line); "
                                "never pip install torch over it"))
        else:
            checks.append(Check(sec, "torch", INFO, f"{torch_v} (from the Habana image; not pinned here)"))
        ds = version_of("deepspeed")
        if twin:
            checks.append(Check(sec, "deepspeed", INFO, f"{ds or 'not installed'}; the Gaudi twin runs DDP plans only "
                                                        "(optimum-habana refuses non-Habana DeepSpeed off an HPU)"))
        elif ds is None:
            checks.append(Check(sec, "deepspeed", FAIL, "not installed",
                                "pip install git+https://github.com/HabanaAI/DeepSpeed.git@<SynapseAI version> "
                                "(the Dockerfile does this)"))
        elif "hpu" not in (ds.split("+", 1)[1] if "+" in ds else ""):
            checks.append(Check(sec, "deepspeed", FAIL,
                                f"{ds}: not HabanaAI's fork (its versions look like 0.16.1+hpu.synapse.v1.22.0)",
                                "pip uninstall deepspeed, then pip install "
                                "git+https://github.com/HabanaAI/DeepSpeed.git@<SynapseAI version> (the Dockerfile does this)"))
        else:
            checks.append(Check(sec, "deepspeed", OK, f"{ds} (HabanaAI fork)"))
        plugin = version_of("habana-torch-plugin")
        status = version_status(plugin, VALIDATED_SYNAPSE)
        if plugin is None:
            checks.append(Check(sec, "habana-torch-plugin", FAIL, "not installed: no SynapseAI PyTorch bridge",
                                "run inside Habana's 1.24 PyTorch image (the Dockerfile's FROM line)"))
        elif status == OK:
            checks.append(Check(sec, "habana-torch-plugin", OK, f"{plugin} (SynapseAI 1.24, the release optimum-habana "
                                                                "1.21.2 is validated with)"))
        else:
            checks.append(Check(sec, "habana-torch-plugin", WARN,
                                f"{plugin}: optimum-habana 1.21.2 is validated with SynapseAI 1.24 only (it warns of "
                                "'undefined behavior' otherwise)",
                                "use the 1.24 Habana image and HabanaAI/DeepSpeed of the same release (see the Dockerfile)"))
    return checks


# --------------------------------------------------------------------------------------------
# accelerator


def _count_check(sec: str, what: str, visible: int | None, source: str, cards: int | None,
                 unknown_fix: str) -> Check:
    if visible is None:
        return Check(sec, "visible cards", FAIL if cards else WARN, f"cannot count the visible {what}s ({source})",
                     unknown_fix)
    if visible == 0:
        return Check(sec, "visible cards", FAIL, f"no {what} is visible ({source})", unknown_fix)
    if cards is not None and cards > visible:
        return Check(sec, "visible cards", FAIL,
                     f"--cards {cards} asked for, but only {visible} {what}(s) are visible ({source})",
                     f"ask for --cards {visible} (or fewer), or make more {what}s visible to this process")
    asked = f"; --cards {cards} fits" if cards is not None else ""
    return Check(sec, "visible cards", OK, f"{visible} {what}(s) visible ({source}){asked}")


def _hpu_checks(environ: Mapping[str, str], cards: int | None, run_tool) -> list[Check]:
    sec = "accelerator"
    checks = []
    lazy = environ.get("PT_HPU_LAZY_MODE")
    why = ("SynapseAI >= 1.21 defaults PT_HPU_LAZY_MODE to 0 (eager mode), but the HPU trainer runs "
           "GaudiDPOConfig(use_lazy_mode=True), which needs lazy mode, and the bridge reads the variable only when "
           "it is first imported, so it must be 1 before Python starts")
    lazy_fix = ("export PT_HPU_LAZY_MODE=1 (the Dockerfile sets it; `launch train` also puts it in command.sh "
                "and .deepspeed_env, but scripts run directly inherit your shell's value)")
    if lazy == "1":
        checks.append(Check(sec, "PT_HPU_LAZY_MODE", OK, "1 (lazy mode)"))
    elif lazy is None:
        checks.append(Check(sec, "PT_HPU_LAZY_MODE", FAIL, f"not set. {why}", lazy_fix))
    else:
        checks.append(Check(sec, "PT_HPU_LAZY_MODE", FAIL, f"is {lazy!r}, must be '1'. {why}", lazy_fix))
    int64 = environ.get("PT_ENABLE_INT64_SUPPORT")
    if int64 == "1":
        checks.append(Check(sec, "PT_ENABLE_INT64_SUPPORT", OK, "1"))
    else:
        shown = "not set" if int64 is None else f"is {int64!r}"
        checks.append(Check(sec, "PT_ENABLE_INT64_SUPPORT", WARN,
                            f"{shown}; int64 tensors (token ids, label masks) need it on HPU",
                            "export PT_ENABLE_INT64_SUPPORT=1 (`launch train` sets it for the ranks it starts)"))
    if importlib.util.find_spec("habana_frameworks") is None:
        checks.append(Check(sec, "habana_frameworks", FAIL, "not importable: this Python has no SynapseAI PyTorch bridge",
                            "run inside the Habana PyTorch image (`make build && make run`)"))
    else:
        checks.append(Check(sec, "habana_frameworks", OK, "importable"))
    spawn = environ.get("GAUDI_SPAWN")
    if spawn:
        if Path(spawn).is_file():
            checks.append(Check(sec, "GAUDI_SPAWN", OK, f"{spawn} exists (single-node launches go through it)"))
        else:
            checks.append(Check(sec, "GAUDI_SPAWN", WARN, f"{spawn} does not exist",
                                "point GAUDI_SPAWN at optimum-habana's examples/gaudi_spawn.py, or unset it "
                                "(the launcher then runs the DeepSpeed command gaudi_spawn would build)"))
    # visible cards
    hl = run_tool(HL_SMI_INDEX)
    hl_count = None if hl is None else len([x for x in hl.splitlines() if x.strip()])
    ids = visible_ids(environ.get("HABANA_VISIBLE_DEVICES", ""))
    sources = []
    visible = None
    if hl_count is not None:
        visible = hl_count
        sources.append(f"hl-smi lists {hl_count}")
    else:
        sources.append("hl-smi not found or failed")
    if ids is not None:
        sources.append(f"HABANA_VISIBLE_DEVICES has {len(ids)}")
        visible = len(ids) if visible is None else min(visible, len(ids))
    elif "HABANA_VISIBLE_DEVICES" in environ:
        sources.append("HABANA_VISIBLE_DEVICES=all")
    checks.append(_count_check(sec, "Gaudi card", visible, ", ".join(sources), cards,
                               "check the driver with `hl-smi`, and in a container pass "
                               "`--runtime=habana -e HABANA_VISIBLE_DEVICES=all` (make run does)"))
    return checks


def _cuda_checks(environ: Mapping[str, str], cards: int | None, run_tool) -> list[Check]:
    sec = "accelerator"
    out = run_tool(["nvidia-smi", "-L"])
    sources = []
    visible = None
    if out is not None:
        visible = len([x for x in out.splitlines() if x.startswith("GPU ")])
        sources.append(f"nvidia-smi -L lists {visible}")
    else:
        try:
            import torch  # lazily: only when nvidia-smi cannot answer

            visible = int(torch.cuda.device_count())
            sources.append(f"torch.cuda.device_count() = {visible}")
        except Exception as e:  # no torch, or a broken CUDA runtime
            sources.append(f"nvidia-smi not found and torch.cuda unavailable ({type(e).__name__})")
    ids = visible_ids(environ.get("CUDA_VISIBLE_DEVICES", ""))
    if ids is not None and out is not None:  # torch.cuda already honours CUDA_VISIBLE_DEVICES
        sources.append(f"CUDA_VISIBLE_DEVICES has {len(ids)}")
        visible = min(visible, len(ids))
    return [_count_check(sec, "GPU", visible, ", ".join(sources), cards,
                         "check the driver with `nvidia-smi`, and in a container pass `--gpus all`")]


def _cpu_checks(cards: int | None) -> list[Check]:
    sec = "accelerator"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    detail = f"{cores} usable CPU core(s); each rank gets OMP_NUM_THREADS = cores / ranks"
    if cards is not None and cards > cores:
        return [Check(sec, "cpu cores", WARN, f"{detail}; --cards {cards} ranks oversubscribe them (slow, but it runs)",
                      f"use --cards {cores} or fewer")]
    return [Check(sec, "cpu cores", INFO, detail + (f"; --cards {cards} ranks" if cards else ""))]


def _detect_kind() -> tuple:
    if importlib.util.find_spec("habana_frameworks") is not None or shutil.which("hl-smi"):
        return "hpu", "habana_frameworks / hl-smi found"
    if shutil.which("nvidia-smi"):
        return "cuda", "nvidia-smi found"
    return "cpu", "no hl-smi, habana_frameworks or nvidia-smi"


# --------------------------------------------------------------------------------------------
# hostfile


def _probe_host(host: str, port: int, timeout: float) -> dict:
    """Resolve `host` and try a TCP connection to `port`. No shell, no ssh: just sockets."""
    result = {"host": host, "addrs": [], "resolved": False, "reachable": False, "error": None, "banner": ""}
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        result["error"] = f"does not resolve ({getattr(e, 'strerror', None) or e})"
        return result
    addrs, seen = [], set()
    for family, socktype, proto, _, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.add(sockaddr[0])
            addrs.append((family, socktype, proto, sockaddr))
    result["resolved"] = True
    result["addrs"] = [a[3][0] for a in addrs]
    errors = []
    for family, socktype, proto, sockaddr in addrs[:4]:
        try:
            with socket.socket(family, socktype, proto) as s:
                s.settimeout(timeout)
                s.connect(sockaddr)
                # sshd speaks first ("SSH-2.0-OpenSSH_..."): a bare TCP accept could be a proxy or another service.
                try:
                    banner = s.recv(256)
                except (TimeoutError, OSError):
                    banner = b""
            result["reachable"] = True
            result["error"] = None
            first = banner.split(b"\n", 1)[0].decode("ascii", "replace").strip()
            result["banner"] = "".join(c for c in first if c.isprintable())[:60]
            return result
        except ConnectionRefusedError:
            errors.append(f"{sockaddr[0]}: connection refused (nothing listens on port {port})")
        except TimeoutError:
            errors.append(f"{sockaddr[0]}: no answer within {timeout:g} s (host down or a firewall)")
        except OSError as e:
            errors.append(f"{sockaddr[0]}: {e.strerror or e}")
    result["error"] = "; ".join(errors) or "no address to connect to"
    return result


def _hostfile_checks(path: str, cards: int | None, kind: str, ssh_port: int, timeout: float,
                     probe=_probe_host) -> list[Check]:
    sec = "hostfile"
    try:
        hosts = parse_hostfile(Path(path), expected_slots=cards)
        parse_error = None
    except HostfileError as e:
        parse_error = e
        hosts = None
        if cards is not None:  # e.g. only the slots differ from --cards: still probe the hosts
            try:
                hosts = parse_hostfile(Path(path))
            except HostfileError:
                hosts = None
    if parse_error is not None:
        checks = [Check(sec, "parse", FAIL, str(parse_error))]  # the message carries the line, column and fix
        if hosts is None:
            return checks
    else:
        slots = [h.slots for h in hosts]
        checks = [Check(sec, "parse", OK, f"{path}: {len(hosts)} node(s), slots {'/'.join(map(str, slots))}, "
                                          f"world size {sum(slots)}, master {hosts[0].host}")]
    if not isinstance(ssh_port, int) or isinstance(ssh_port, bool) or not 1 <= ssh_port <= 65535:
        checks.append(Check(sec, "ssh port", FAIL, f"--ssh_port must be 1..65535, got {ssh_port!r}",
                            f"use 22, or {HABANA_SSH_PORT} for Habana containers"))
        return checks
    multi = len(hosts) > 1
    if multi and kind != "cpu" and shutil.which("pdsh") is None:
        checks.append(Check(sec, "pdsh", FAIL, "pdsh is not installed; DeepSpeed's multi-node runner starts the ranks "
                                               "with it", "install it on this node (e.g. apt-get install pdsh)"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        results = list(pool.map(lambda h: probe(h.host, ssh_port, timeout), hosts))
    for entry, r in zip(hosts, results):
        label = f"line {entry.line}: {entry.host}"
        loopback = is_loopback(entry.host) or (r["addrs"] and all(is_loopback(a) for a in r["addrs"]))
        if not r["resolved"]:
            checks.append(Check(sec, label, FAIL, r["error"],
                                "fix the name, add it to /etc/hosts or DNS, or use the node's IP address"))
            continue
        where = ", ".join(r["addrs"][:3])
        if r["reachable"] and r.get("banner", "").startswith("SSH-"):
            checks.append(Check(sec, label, OK, f"resolves to {where}; sshd answers on port {ssh_port} ({r['banner']})"))
        elif r["reachable"]:
            checks.append(Check(sec, label, WARN,
                                f"resolves to {where}; port {ssh_port} accepts connections but sent no SSH banner "
                                f"within {timeout:g} s (another service, or a proxy in between?)",
                                f"check that sshd listens on port {ssh_port} there (`ssh -p {ssh_port} {entry.host} true`)"))
        elif loopback:
            checks.append(Check(sec, label, WARN,
                                f"resolves to {where} (loopback); ssh port {ssh_port} is not reachable: {r['error']}. "
                                "Fine for the CPU loopback launch (--no_ssh); DeepSpeed's pdsh path would need sshd here",
                                f"start sshd on port {ssh_port} only if you launch through pdsh/ssh"))
        else:
            fix = (f"start sshd on that node (Habana containers run it on port {HABANA_SSH_PORT}: --ssh_port "
                   f"{HABANA_SSH_PORT}), allow port {ssh_port} through the firewall, and set up passwordless ssh")
            status = WARN if kind == "cpu" else FAIL
            why = ("CPU multi-node runs one command per node (--no_ssh), so ssh is optional"
                   if kind == "cpu" else "DeepSpeed's pdsh runner needs ssh to every node")
            checks.append(Check(sec, label, status,
                                f"resolves to {where}, but ssh port {ssh_port} is not reachable: {r['error']}. {why}", fix))
    addr_sets = {}
    for entry, r in zip(hosts, results):
        if r["addrs"]:
            addr_sets.setdefault(tuple(sorted(r["addrs"])), []).append(entry.host)
    same = [names for names in addr_sets.values() if len(names) > 1]
    for names in same:
        checks.append(Check(sec, "same machine", INFO, f"{', '.join(names)} resolve to the same addresses: "
                                                       "these 'nodes' are one machine (fine for a loopback test)"))
    return checks


# --------------------------------------------------------------------------------------------
# secrets


def _secret_checks(environ: Mapping[str, str], multi: bool) -> list[Check]:
    sec = "secrets"
    checks = []
    names = [n for n in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if environ.get(n)]
    hf_home = environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    token_file = Path(environ.get("HF_TOKEN_PATH") or os.path.join(hf_home, "token"))
    stored = token_file.is_file()
    how = ("the launcher never forwards it (not in command.sh, .deepspeed_env or logs): on each node run "
           "`huggingface-cli login` once (stores the token under ~/.cache/huggingface/token), or set HF_TOKEN in "
           "that node's own environment/container (`make run HF_TOKEN=...` passes it with docker run -e HF_TOKEN)")
    parts = [f"{n}: set" for n in names] or ["HF_TOKEN: not set"]
    parts.append(f"stored token ({token_file}): {'present' if stored else 'absent'}")
    offline = environ.get("HF_HUB_OFFLINE")
    if offline:
        parts.append("HF_HUB_OFFLINE is set (models must be pre-downloaded)")
    if names or stored:
        checks.append(Check(sec, "hugging face token", OK, "; ".join(parts) + ". Other nodes: " + how))
    else:
        checks.append(Check(sec, "hugging face token", INFO, "; ".join(parts) + ". Gated models (Llama, Gemma) need a "
                            "token on every node: " + how))
    for env_file in (Path.home() / ".deepspeed_env", Path.cwd() / ".deepspeed_env"):
        try:
            lines = env_file.read_text().splitlines() if env_file.is_file() else []
        except OSError:
            continue
        bad = sorted({ln.split("=", 1)[0].strip() for ln in lines if "=" in ln
                      and is_secret_name(ln.split("=", 1)[0].strip())})
        if bad:
            checks.append(Check(sec, str(env_file), WARN if not multi else FAIL,
                                f"names secret-like variables ({', '.join(bad)}); DeepSpeed sends this file to every node "
                                "as `export` lines on the pdsh command line",
                                "remove them from the file; give each node its own credentials"))
    return checks


# --------------------------------------------------------------------------------------------
# driver


def collect_checks(hardware: str | None = None, hostfile: str | None = None, cards: int | None = None,
                   environ: Mapping[str, str] | None = None, ssh_port: int = DEFAULT_SSH_PORT,
                   timeout: float = CONNECT_TIMEOUT_S, version_of: Callable[[str], str | None] = _installed,
                   run_tool: Callable[[Sequence[str]], str | None] = run_tool) -> list[Check]:
    """Every check, as data. Arguments as for `run_doctor`; `version_of` and `run_tool` are
    injectable for tests."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    checks: list[Check] = []
    if hardware is None:
        kind, why = _detect_kind()
        checks.append(Check("setup", "hardware", INFO, f"not given; detected {kind} ({why}). Pass --hardware to be sure"))
    elif hardware.lower() not in HARDWARE_CHOICES:
        return [Check("setup", "hardware", FAIL, f"unknown hardware {hardware!r}",
                      f"use one of: {', '.join(HARDWARE_CHOICES)}")]
    else:
        kind = {"gaudi2": "hpu", "gaudi3": "hpu", "hpu": "hpu"}.get(hardware.lower(), hardware.lower())
        checks.append(Check("setup", "hardware", INFO, hardware if hardware.lower() == kind else f"{hardware} ({kind})"))
    if cards is not None and (isinstance(cards, bool) or not isinstance(cards, int) or cards < 1):
        checks.append(Check("setup", "cards", FAIL, f"--cards must be a positive integer, got {cards!r}",
                            "ask for at least 1 card per node"))
        cards = None
    elif cards is not None and kind == "hpu" and cards > 8:
        checks.append(Check("setup", "cards", FAIL, f"--cards {cards}: a Gaudi node has 8 cards",
                            "use --cards 8 per node and a hostfile for more nodes"))
    twin = kind == "hpu" and twin_requested(env)
    checks += _version_checks(kind, version_of, twin=twin)
    if twin:
        checks.append(Check("accelerator", "Gaudi twin", INFO,
                            f"${TWIN_ENV} is set: optimum-habana's code runs on CPU ranks (a development aid, "
                            "tests/support/habana_shim stands in for habana_frameworks); no Gaudi card is checked"))
        checks += _cpu_checks(cards)
    elif kind == "hpu":
        checks += _hpu_checks(env, cards, run_tool)
    elif kind == "cuda":
        checks += _cuda_checks(env, cards, run_tool)
    else:
        checks += _cpu_checks(cards)
    multi = False
    if hostfile:
        hf_checks = _hostfile_checks(hostfile, cards, kind, ssh_port, timeout)
        multi = len([c for c in hf_checks if c.name.startswith("line ")]) > 1
        checks += hf_checks
    checks += _secret_checks(env, multi)
    return checks


_SECTION_TITLES = {
    "setup": "Setup",
    "versions": "Package versions",
    "accelerator": "Accelerator",
    "hostfile": "Hostfile",
    "secrets": "Secrets",
}


def render_checks(checks: Sequence[Check]) -> str:
    """Plain-text checklist: one `[ OK ]`/`[WARN]`/`[FAIL]`/`[INFO]` line per check, its fix
    indented below, then a summary line."""
    lines = ["dpo-dist doctor"]
    section = None
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append("")
            lines.append(_SECTION_TITLES.get(section, section.capitalize()))
        detail = c.detail.replace("\n", "\n           ")
        lines.append(f"  {_TAGS[c.status]} {c.name}: {detail}")
        if c.fix and c.status in (WARN, FAIL):
            lines.append(f"           fix: {c.fix}")
    failed = [c for c in checks if c.failed]
    warned = [c for c in checks if c.status == WARN]
    lines.append("")
    if failed:
        lines.append(f"doctor: {len(failed)} required check(s) failed ({', '.join(c.name for c in failed)}); "
                     f"{len(warned)} warning(s).")
    else:
        lines.append(f"doctor: all required checks passed; {len(warned)} warning(s).")
    return "\n".join(lines)


def run_doctor(hardware: str | None = None, hostfile: str | None = None, cards: int | None = None,
               environ: Mapping[str, str] | None = None, ssh_port: int = DEFAULT_SSH_PORT,
               timeout: float = CONNECT_TIMEOUT_S, out: TextIO | None = None) -> int:
    """Print the checklist; 0 if every required check passes, 1 otherwise.

    hardware: gaudi2 | gaudi3 | hpu | cuda | cpu, or None to detect it.
    hostfile: a `host slots=N` file whose hosts are resolved and probed on `ssh_port`.
    cards: cards per node you intend to use (checked against the visible ones and the slots).
    environ: the environment to check (default os.environ). Values are never printed.
    ssh_port: the port DeepSpeed's pdsh/ssh will use (22; Habana containers run sshd on 3022).
    timeout: seconds per TCP connection attempt.
    """
    checks = collect_checks(hardware=hardware, hostfile=hostfile, cards=cards, environ=environ,
                            ssh_port=ssh_port, timeout=timeout)
    stream = sys.stdout if out is None else out
    print(render_checks(checks), file=stream)
    stream.flush()
    return 1 if any(c.failed for c in checks) else 0
