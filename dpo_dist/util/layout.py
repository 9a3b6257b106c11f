"""The names of the files a run leaves in its output folder: one home, read by the ranks, the post-step,
the comparison, the launcher and the bench."""

METRICS_FILE = "training_metrics.json"  # the rank's summary: losses, accuracy, throughput, memory, the plan it ran
DIAGNOSTICS_FILE = "diagnostics.json"  # --diagnostics: reference log-probs before/after, shard sizes
TRAINER_STATE = "trainer_state.json"  # transformers' Trainer state in every checkpoint-*/ (log_history)
MERGE_REPORT = "merge_report.json"  # the merge post-step's verification figures, next to the merged weights
CHECKPOINT_PREFIX = "checkpoint-"  # transformers' checkpoint folders: checkpoint-<global step>
