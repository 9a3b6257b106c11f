"""The engine's DPO losses equal trl 0.22's ``DPOTrainer.dpo_loss`` for the same log-probs, for every loss type."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dpo_dist.train.losses import LOSS_TYPES, dpo_losses
from support.engine_probe import RunningMean


def _trl_self(beta, label_smoothing, running):
    from trl.trainer.dpo_config import FDivergenceType

    return SimpleNamespace(
        accelerator=SimpleNamespace(device=torch.device("cpu")), reference_free=False,
        f_divergence_type=FDivergenceType.REVERSE_KL.value, f_divergence_params={}, beta=beta,
        label_smoothing=label_smoothing, running=running, args=SimpleNamespace(discopop_tau=0.05),
        loss_type=["sigmoid"])


def _logps(seed, b=6):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(b, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]


def test_trl_lists_the_same_loss_types():
    """The list is trl 0.22's: the names its DPOConfig help and dpo_loss's error message give."""
    import dataclasses
    import re

    from trl import DPOConfig

    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    assert set(re.findall(r"`'([a-z_]+)'`", help_text)) == set(LOSS_TYPES)


# The losses whose formula uses label smoothing (trl ignores it for the others).
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")


@pytest.mark.parametrize("loss_type,label_smoothing", [(lt, 0.0) for lt in LOSS_TYPES] + [(lt, 0.2) for lt in SMOOTHED])
def test_losses_equal_trl_022(loss_type, label_smoothing):
    from trl import DPOTrainer

    beta = 0.3
    chosen, rejected, ref_chosen, ref_rejected = _logps(hash((loss_type, label_smoothing)) % 1000)
    nll = torch.tensor(2.5, dtype=torch.float64)
    ours = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, loss_type, beta=beta, label_smoothing=label_smoothing,
                      nll_loss=nll, running=RunningMean())
    theirs = DPOTrainer.dpo_loss(_trl_self(beta, label_smoothing, RunningMean()), chosen, rejected, ref_chosen, ref_rejected,
                                 loss_type, {"nll_loss": nll})
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(ours[0]).all()


def test_sigmoid_prefers_the_chosen_response():
    """A policy that moved toward the chosen response has a lower loss and positive margins."""
    ref_c, ref_r = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0])
    same = dpo_losses(ref_c, ref_r, ref_c, ref_r, beta=0.1)[0]
    better = dpo_losses(ref_c + 2, ref_r - 2, ref_c, ref_r, beta=0.1)
    torch.testing.assert_close(same, torch.full((2,), torch.log(torch.tensor(2.0)).item()))
    assert (better[0] < same).all() and (better[1] > better[2]).all()


def test_unknown_loss_and_missing_inputs_are_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss 'kto_pair'"):
        dpo_losses(x, x, x, x, "kto_pair", beta=0.1)
    with pytest.raises(ValueError, match="running-mean"):
        dpo_losses(x, x, x, x, "bco_pair", beta=0.1)
    with pytest.raises(ValueError, match="nll_loss"):
        dpo_losses(x, x, x, x, "sft", beta=0.1)
