"""Cluster jobs from the same plan: `launch train --emit slurm` (run_dir/launch.sbatch) and `--emit k8s`
(run_dir/mpijob.yaml, a Kubeflow MPIJob). The node command and environment come from the LaunchCommand `launch train`
builds (launch/cluster/common.py); these modules only write the scheduler's glue around them. Pure: no process is
started, nothing is imported that plans cannot run without (no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from launch.cluster.common import (
    CLUSTER_FLAGS,
    EMIT_KINDS,
    ClusterError,
    ClusterOptions,
    NodeLaunch,
    check_cluster_options,
    cluster_command_overrides,
    node_launch,
    refuse_secret_values,
)
from launch.cluster.k8s import MPIJOB_FILE, render_mpijob
from launch.cluster.slurm import SBATCH_FILE, render_sbatch

__all__ = ["CLUSTER_FLAGS", "EMIT_KINDS", "ClusterError", "ClusterOptions", "NodeLaunch", "check_cluster_options",
           "cluster_command_overrides", "node_launch", "render_cluster_files", "SBATCH_FILE", "MPIJOB_FILE"]


def render_cluster_files(opts: ClusterOptions, cmd, plan, run_dir: Path, *, workdir: str, environ: Mapping[str, str],
                         extra_env_names=(), python_bin: str | None = None) -> dict[str, tuple[str, int]]:
    """{file name in the run dir: (text, mode)} for `opts.kind`, from the launch command `cmd` of the plan."""
    if cmd.num_nodes != plan.nodes or cmd.world_size != plan.world_size:
        raise ClusterError(f"the command starts {cmd.num_nodes} node(s), world size {cmd.world_size}, but the plan is for "
                           f"{plan.nodes} node(s), world size {plan.world_size}. Fix: give --nodes (or a hostfile) "
                           "that matches the plan.")
    launch = node_launch(cmd, plan.hardware, plan.cards_per_node, environ, extra_env_names)
    if opts.kind == "slurm":
        name, text, mode = SBATCH_FILE, render_sbatch(launch, opts, run_dir, workdir, python_bin), 0o755
    else:
        name, text, mode = MPIJOB_FILE, render_mpijob(launch, opts, run_dir, plan), 0o644
    return {name: (refuse_secret_values(text, name, environ), mode)}
