"""The DPO loss family, computed from sequence log-probabilities: one implementation for every backend.

Why hand-written: the two trainer APIs dpo-dist runs on compute the loss differently. trl 0.22's
``DPOTrainer.dpo_loss`` (CPU/CUDA) knows 14 loss types; optimum-habana 1.21.2's ``GaudiDPOTrainer``
inherits trl 0.9.6's, which knows 10 and differs in details (metrics are not gathered over ranks,
precomputed reference log-probs are read only when ``rpo_alpha`` is set). Computing the loss here,
from the log-probs the engine produced, makes the list and the values the same on every backend.
The formulas are trl 0.22's (``trl/trainer/dpo_trainer.py``, ``DPOTrainer.dpo_loss``, reverse-KL
divergence, reference not free); ``tests/dpo_dist/train/test_losses.py`` checks every type against trl 0.22's own
``dpo_loss`` on the same log-probs.

Shapes: every log-prob argument is ``[b]`` (one value per pair). Returns per-pair losses ``[b]`` and
the implicit rewards ``beta * (policy - reference)`` of the chosen and rejected responses (detached).
"""

from __future__ import annotations

import math

# Every loss type the engine computes (trl 0.22's list). One home: the argument parser, the HPU
# adapter and the docs import it from here.
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_pair", "apo_zero", "apo_down", "discopop", "sft",
)
# Losses whose sequence log-probs are length-normalised (mean over completion tokens, not the sum).
LENGTH_NORMALISED = ("ipo",)
# trl 0.22's DPOConfig default for the DiscoPOP mixing temperature.
DISCOPOP_TAU = 0.05
# exo_pair needs a strictly positive smoothing epsilon; trl uses 1e-3 when label_smoothing is 0.
EXO_MIN_SMOOTHING = 1e-3


def check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose one of: {', '.join(LOSS_TYPES)}")


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type: str = "sigmoid", *,
               beta: float, label_smoothing: float = 0.0, nll_loss=None, running=None,
               discopop_tau: float = DISCOPOP_TAU):
    """(losses [b], chosen_rewards [b], rejected_rewards [b]) for one loss type.

    ``nll_loss``: the policy's mean negative log-likelihood of the chosen completions (a scalar), needed by
    ``sft``. ``running``: a running-mean tracker with ``update(x)`` and ``mean`` (trl's ``RunningMoments``,
    which averages over ranks), needed by ``bco_pair``.
    """
    import torch
    import torch.nn.functional as F

    check_loss_type(loss_type)
    ref_chosen_logps = ref_chosen_logps.to(chosen_logps.device)
    ref_rejected_logps = ref_rejected_logps.to(chosen_logps.device)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    ls = label_smoothing

    def smoothed_sigmoid(x):
        return -F.logsigmoid(beta * x) * (1 - ls) - F.logsigmoid(-beta * x) * ls

    if loss_type == "sigmoid":
        losses = smoothed_sigmoid(logits)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    elif loss_type == "exo_pair":
        eps = ls if ls != 0 else EXO_MIN_SMOOTHING
        losses = (beta * logits).sigmoid() * (F.logsigmoid(beta * logits) - math.log(1 - eps)) + (
            -beta * logits).sigmoid() * (F.logsigmoid(-beta * logits) - math.log(eps))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        if running is None:
            raise ValueError("bco_pair needs a running-mean tracker (running=)")
        rewards = torch.cat((beta * chosen_logratios, beta * rejected_logratios), 0).mean().detach()
        running.update(rewards)
        delta = running.mean
        losses = -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "nca_pair":
        c, r = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    elif loss_type == "aot_pair":
        delta = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
        losses = smoothed_sigmoid(delta)
    elif loss_type == "aot":
        delta = (torch.sort(chosen_logps - rejected_logps, dim=0)[0]
                 - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0])
        losses = smoothed_sigmoid(delta)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    elif loss_type == "discopop":
        x = beta * logits
        modulation = torch.sigmoid(x / discopop_tau)
        losses = -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x) * modulation
    else:  # sft: the NLL of the chosen completions, the same value for every pair
        if nll_loss is None:
            raise ValueError("the sft loss needs the policy's nll_loss of the chosen completions")
        losses = nll_loss.expand(chosen_logps.shape[0])
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
