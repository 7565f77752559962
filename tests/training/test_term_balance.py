"""The start-of-training warning for a loss term that outweighs the others by orders of magnitude."""

from __future__ import annotations

import logging

import torch

from nlm.distill.hidden_states import HiddenStatesTerm
from nlm.distill.loss import LossParts
from nlm.distill.objective import CrossEntropyTerm, DistillationTerm, Objective, WeightedTerm
from nlm.training.term_balance import unbalanced_term, warn_unbalanced_terms


def _objective() -> Objective:
    return Objective([WeightedTerm(CrossEntropyTerm(), 0.5), WeightedTerm(DistillationTerm(), 2.0),
                      WeightedTerm(HiddenStatesTerm({0: 0}, "mse", 4, 4), 1.0)])


def _parts(ce: float, kd: float, hidden: float) -> LossParts:
    terms = {"ce": torch.tensor(ce), "kd": torch.tensor(kd), "hidden_states": torch.tensor(hidden)}
    return LossParts(total=torch.tensor(0.0), task=terms["ce"], distill=terms["kd"], tokens=10, terms=terms)


def test_a_term_a_hundred_times_the_others_is_named_with_its_ratio(caplog):
    # the figures: a raw MSE of ~4,500 per token against CE ~14 (weighted: 7) and KD ~3 (weighted: 6)
    message = unbalanced_term(_objective(), _parts(14.0, 3.0, 4500.0))
    assert message is not None and message.startswith("loss term hidden_states is 346x the other terms")
    assert "ce 7" in message and "kd 6" in message
    with caplog.at_level(logging.WARNING, logger="nlm.training"):
        warn_unbalanced_terms(_objective(), _parts(14.0, 3.0, 4500.0))
    assert "hidden_states is 346x" in caplog.text


def test_balanced_terms_and_a_single_term_give_no_warning():
    assert unbalanced_term(_objective(), _parts(14.0, 3.0, 1.2)) is None  # the normalised mse: order 1
    only_ce = Objective([WeightedTerm(CrossEntropyTerm(), 1.0), WeightedTerm(DistillationTerm(), 0.0)])
    assert unbalanced_term(only_ce, _parts(14.0, 0.0, 0.0)) is None  # weight 0 terms do not count
