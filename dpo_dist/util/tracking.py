"""Experiment trackers (`--report_to`): which ones exist, whether each is installed, and the comparison's own logging.

The trainers (trl / optimum-habana, through transformers) do the logging of training: `--report_to tensorboard`
writes event files under `<output_dir>/runs/` (transformers' default logging_dir). A tracker that is not installed
would make transformers raise deep inside the trainer, after the data loaded, as a traceback; `check_report_to`
refuses it first (the ranks' argument checks, and the launcher before it writes the run dir), naming the pip package
to install. No import here: availability is `importlib.util.find_spec`, as transformers itself tests it, so the
launcher (which never imports torch) can call it.

`log_comparison` is the comparison's (dpo_dist/post/compare.py) logging to the same tracker: its metrics as scalars
and its plots as images (tensorboard, mlflow, wandb; another tracker is named in a warning and skipped).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from dpo_dist.util.errors import ArgumentError

logger = logging.getLogger("dpo_dist")

# transformers 4.55's report_to names (integrations.INTEGRATION_TO_CALLBACK): (module to find, pip package).
# Several modules: every one is needed. tensorboard: transformers takes tensorboard or tensorboardX.
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard (pinned in requirements.txt / requirements-gaudi.txt: "
                                      "`make setup`, or pip install -r requirements.txt)"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow (or the lighter mlflow-skinny)"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "neptune": (("neptune",), "neptune"),
    "azure_ml": (("azureml.core",), "azureml-core"),
    "codecarbon": (("codecarbon",), "codecarbon"),
    "dagshub": (("dagshub", "mlflow"), "dagshub mlflow"),
    "flyte": (("flytekit",), "flytekit"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}
NO_TRACKER = ("none", "")
ALL_TRACKERS = "all"  # transformers: every installed one


def tracker_names(value) -> list[str]:
    """The trackers named by a `--report_to` value ("tensorboard", "tensorboard,mlflow", a list): [] for none."""
    if value is None:
        return []
    words = value if isinstance(value, list | tuple) else str(value).split(",")
    names = [w.strip() for w in words if w and w.strip()]
    return [] if all(n in NO_TRACKER for n in names) else names


def report_to_value(value):
    """The value the trainers' configs take: one name as it is, several as a list (transformers reads a string as one
    name)."""
    names = tracker_names(value)
    if not names:
        return "none"
    return names[0] if len(names) == 1 else names


def _installed(modules: Sequence[str], find_spec=importlib.util.find_spec) -> bool:
    for m in modules:
        try:
            if find_spec(m) is None:
                return False
        except (ImportError, ValueError):  # a parent package missing (azureml.core without azureml)
            return False
    return True


def check_report_to(value, *, flag: str = "--report_to", find_spec=importlib.util.find_spec) -> None:
    """ArgumentError naming the tracker and the pip package when a tracker in ``value`` is unknown or not installed
    in this Python; nothing is imported."""
    names = tracker_names(value)
    for name in names:
        if name == ALL_TRACKERS:
            continue
        if name in NO_TRACKER:
            raise ArgumentError(f"{flag} {value}: 'none' cannot be combined with a tracker. Fix: give only the "
                                "trackers, or none.")
        if name not in TRACKERS:
            raise ArgumentError(f"{flag} {value}: unknown tracker {name!r}. Choose from: none, all, "
                                f"{', '.join(TRACKERS)} (comma-separated for several).")
        modules, package = TRACKERS[name]
        if name == "tensorboard" and _installed(("tensorboardX",), find_spec):
            continue
        if not _installed(modules, find_spec):
            raise ArgumentError(f"{flag} {name}: {name} is not installed in this Python environment. Nothing was "
                                f"written. Fix: pip install {package}, or drop {name} from {flag} (--report_to none: "
                                "no tracker).")


# --- the comparison's logging -------------------------------------------------------------------------------------


def flat_scalars(tree: Mapping, prefix: str = "") -> dict[str, float]:
    """{"a/b/c": value} of every finite number in a nested mapping (lists and text are left out)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_scalars(v, key + "/"))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int | float) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def _png_array(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def log_comparison(report_to, *, logging_dir: str | os.PathLike, scalars: Mapping[str, float],
                   images: Mapping[str, str | os.PathLike], step: int = 0, run_name: str = "compare") -> list[str]:
    """Log the comparison's scalars and plots (PNG files) to each tracker of ``report_to``; returns the trackers
    written to. tensorboard: event files in ``logging_dir`` (add_scalar, add_image); mlflow: a run named ``run_name``
    in the tracking store transformers would use (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), metrics and the
    PNGs as artifacts; wandb: one wandb.log with wandb.Image plots."""
    names = tracker_names(report_to)
    if ALL_TRACKERS in names:
        names = [n for n in ("tensorboard", "mlflow", "wandb") if _installed(TRACKERS[n][0])]
    done = []
    for name in names:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # deferred: torch

            Path(logging_dir).mkdir(parents=True, exist_ok=True)
            writer = SummaryWriter(log_dir=str(logging_dir))
            try:
                for tag, value in scalars.items():
                    writer.add_scalar(tag, value, global_step=step)
                for tag, path in images.items():
                    writer.add_image(tag, _png_array(path), global_step=step, dataformats="HWC")
            finally:
                writer.close()
        elif name == "mlflow":
            import mlflow  # deferred: optional

            if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
                mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
            with mlflow.start_run(run_name=run_name):
                mlflow.log_metrics({_mlflow_key(k): v for k, v in scalars.items()}, step=step)
                for path in images.values():
                    mlflow.log_artifact(str(path), artifact_path="plots")
        elif name == "wandb":
            import wandb  # deferred: optional

            run = wandb.run or wandb.init(name=run_name, reinit=True)
            run.log({**scalars, **{k: wandb.Image(str(p)) for k, p in images.items()}}, step=step)
        else:
            logger.warning("--report_to %s: the comparison logs to tensorboard, mlflow and wandb only; not to %s",
                           report_to, name)
            continue
        done.append(name)
    return done


def _mlflow_key(key: str) -> str:
    """MLflow metric names: alphanumerics, _ - . space / only."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)
