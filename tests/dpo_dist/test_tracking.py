"""Trackers: a tracker that is not installed is refused before anything loads or is written (ranks, launcher,
comparison), with the pip package to install; the comparison's metrics and plots reach TensorBoard (read back with
TensorBoard's own event reader) and MLflow (a local file store, when mlflow is installed)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import run_main
from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.tracking import (
    check_report_to,
    flat_scalars,
    log_comparison,
    report_to_value,
    tracker_names,
)

MISSING = "comet_ml"  # never installed here


def _missing(*names):
    def find_spec(name):
        return None if name.split(".")[0] in names else importlib.util.find_spec(name)
    return find_spec


def test_names_and_values():
    assert tracker_names("none") == [] and tracker_names("") == [] and tracker_names(None) == []
    assert tracker_names("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    assert report_to_value("tensorboard") == "tensorboard" and report_to_value("none") == "none"
    assert report_to_value("tensorboard,mlflow") == ["tensorboard", "mlflow"]


def test_installed_and_missing_trackers():
    check_report_to("none")
    check_report_to("tensorboard")  # pinned in requirements.txt
    check_report_to("all")
    with pytest.raises(ArgumentError, match=r"wandb is not installed.*Fix: pip install wandb"):
        check_report_to("tensorboard,wandb", find_spec=_missing("wandb"))
    with pytest.raises(ArgumentError, match=r"pip install tensorboard \(pinned in requirements.txt"):
        check_report_to("tensorboard", find_spec=_missing("tensorboard", "tensorboardX"))
    with pytest.raises(ArgumentError, match=r"pip install comet-ml"):
        check_report_to(MISSING, find_spec=_missing(MISSING))
    with pytest.raises(ArgumentError, match="unknown tracker 'tensorbord'"):
        check_report_to("tensorbord")
    with pytest.raises(ArgumentError, match="cannot be combined"):
        check_report_to("none,wandb")


@pytest.mark.skipif(importlib.util.find_spec(MISSING) is not None, reason=f"{MISSING} is installed here")
def test_rank_refuses_a_missing_tracker_before_anything_loads(tmp_path, tiny_assets):
    from dpo_dist.dpo import main as dpo_main
    from dpo_dist.sft import main as sft_main

    for main in (dpo_main, sft_main):
        out = tmp_path / "out"
        r = run_main(main, ["--model_name_or_path", tiny_assets.llama_dir, "--dataset_name", tiny_assets.data_dir,
                            "--output_dir", out, "--report_to", f"tensorboard,{MISSING}"])
        assert r.returncode == 2, r.stdout
        assert f"{MISSING} is not installed" in r.stdout and "pip install comet-ml" in r.stdout
        assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec(MISSING) is not None, reason=f"{MISSING} is installed here")
def test_launcher_refuses_a_missing_tracker_before_writing(tmp_path, tiny_assets, capsys):
    from launch.cli import main

    run_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"report_to: {MISSING}\n")
    for extra in (["--report_to", MISSING], ["--config", str(recipe)]):
        rc = main(["train", "--model", str(tiny_assets.llama_dir), "--hardware", "cpu", "--cards", "1", "--dry_run",
                   "--run_dir", str(run_dir), "--", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "pip install comet-ml" in err, err
        assert not run_dir.exists()


@pytest.mark.skipif(importlib.util.find_spec(MISSING) is not None, reason=f"{MISSING} is installed here")
def test_compare_refuses_a_missing_tracker(tmp_path, tiny_assets):
    from dpo_dist.post.compare import main

    out = tmp_path / "cmp" / "results.json"
    r = run_main(main, ["--base_model", tiny_assets.llama_dir, "--finetuned_model", tiny_assets.llama_dir,
                        "--dataset_name", tiny_assets.data_dir, "--output_json", out, "--report_to", MISSING])
    assert r.returncode == 2 and "pip install comet-ml" in r.stdout, r.stdout
    assert not out.parent.exists()


def _png(path, color):
    from PIL import Image

    Image.new("RGB", (8, 6), color).save(path)
    return path


def test_flat_scalars():
    tree = {"Base": {"acc": 0.5, "lengths": [1, 2], "name": "x", "flag": True}, "n": 3, "bad": float("nan")}
    assert flat_scalars(tree, "compare/") == {"compare/Base/acc": 0.5, "compare/n": 3.0}


def test_comparison_to_tensorboard_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    images = {"compare/accuracy": _png(tmp_path / "a.png", "red"), "compare/lengths": _png(tmp_path / "b.png", "blue")}
    done = log_comparison("tensorboard", logging_dir=logdir, scalars={"compare/DPO/acc": 0.75, "compare/kl": 0.1},
                          images=images, step=40)
    assert done == ["tensorboard"]
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"compare/DPO/acc", "compare/kl"} and set(tags["images"]) == set(images)
    (ev,) = acc.Scalars("compare/DPO/acc")
    assert ev.step == 40 and ev.value == pytest.approx(0.75)
    (im,) = acc.Images("compare/accuracy")
    assert (im.width, im.height, im.step) == (8, 6, 40)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is not installed (requirements.txt pins mlflow-skinny: `make setup` installs it)")
def test_comparison_to_mlflow_file_store(tmp_path, monkeypatch):
    import mlflow

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.7 keeps the file store behind this switch
    mlflow.set_tracking_uri(uri)
    done = log_comparison("mlflow", logging_dir=tmp_path / "unused", scalars={"compare/DPO/acc": 0.75},
                          images={"compare/accuracy": _png(tmp_path / "a.png", "red")}, step=7)
    assert done == ["mlflow"]
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (m,) = client.get_metric_history(run.info.run_id, "compare/DPO/acc")
    assert (m.value, m.step) == (0.75, 7)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/a.png"]
