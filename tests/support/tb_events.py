"""Reading back what --report_to tensorboard wrote, with TensorBoard's own event reader (the main venv's)."""

from __future__ import annotations

from pathlib import Path

# What a DPO run's trackers log: the trainer's curves and dpo-dist's throughput/padding figures, then the eval scalars.
TRAIN_TAGS = ("loss", "learning_rate", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
              "pairs_per_s", "tokens_per_s", "padding_fraction", "step_time_s")
EVAL_TAGS = ("loss", "rewards/accuracies", "rewards/margins")


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file under logdir (each run's folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    folders = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
    assert folders, f"no event files under {logdir}"
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def images(logdir: Path) -> set[str]:
    """The image tags of the event files in logdir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    return set(acc.Tags()["images"])
