"""RestartBudget: a bounded number of restarts per sliding window (DESIGN §5.4)."""

from __future__ import annotations

from actors.supervisor import Directive, RestartBudget


def test_allows_max_restarts_within_the_window_then_stops() -> None:
    budget = RestartBudget(3, 60.0)
    assert [budget.decide(t) for t in (0.0, 1.0, 2.0)] == [Directive.RESTART] * 3
    assert budget.decide(3.0) is Directive.STOP
    assert budget.decide(59.0) is Directive.STOP
    assert budget.recent == 3


def test_the_window_slides() -> None:
    budget = RestartBudget(2, 10.0)
    assert budget.decide(0.0) is Directive.RESTART
    assert budget.decide(5.0) is Directive.RESTART
    assert budget.decide(9.0) is Directive.STOP
    assert budget.decide(10.5) is Directive.RESTART  # the restart at 0 left the window
    assert budget.decide(12.0) is Directive.STOP
    assert budget.decide(15.5) is Directive.RESTART  # the one at 5 left it too
    assert budget.recent == 2


def test_a_refusal_does_not_use_up_budget() -> None:
    budget = RestartBudget(1, 10.0)
    assert budget.decide(0.0) is Directive.RESTART
    for t in (1.0, 2.0, 9.0):
        assert budget.decide(t) is Directive.STOP
    assert budget.decide(10.5) is Directive.RESTART


def test_zero_budget_never_restarts() -> None:
    assert RestartBudget(0, 60.0).decide(0.0) is Directive.STOP
