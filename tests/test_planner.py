"""A step's plan (afnext/planner.py): interactive turns first, a long prefill its chunk, and no
starvation of the long one under a steady stream of voice turns."""

from __future__ import annotations

import pytest

from afnext.planner import PASSED_OVER_MAX, Budgets, Planner
from afnext.scheduler import INTERACTIVE_TOKENS, PREFILLING, WAITING, Cancel, Request

BUDGETS = Budgets(prefill_chunk_tokens=128, prefill_step_tokens=512, encode_frames_per_step=3000,
                  encode_chunk_frames=1500)


def request(tokens: int, state: str = PREFILLING) -> Request:
    """A text-only turn of `tokens` prompt tokens (no clips: the planner gives it prompt tokens only)."""
    r = Request(turn=0, cache=None, ids=[0] * tokens, clips=[], options=None, budget=1, seen=[], cancel=Cancel(),
                emit=lambda item: None)
    r.state = state
    return r


def started(r: Request) -> bool:
    r.state = PREFILLING
    return True


def run_steps(planner: Planner, long: Request, steps: int, voice_tokens: int, admit=started) -> list[list[Request]]:
    """`steps` steps, each with a new voice turn waiting beside `long`; a planned request's step
    tokens are taken as prefilled (a voice turn's whole prompt fits a step, or it is dropped after
    its step: a fresh one comes every step)."""
    plans = []
    for _ in range(steps):
        voice = request(voice_tokens, WAITING)
        plan = planner.plan(sorted([voice, long], key=lambda r: not r.interactive), admit)
        plans.append(plan)
        long.fed += long.step_tokens if long in plan else 0
    return plans


def test_a_long_prefill_alone_takes_its_chunk_a_step():
    planner, long = Planner(BUDGETS, encoder_layers=4), request(INTERACTIVE_TOKENS + 1000)
    assert planner.plan([long], started) == [long] and long.step_tokens == 128


@pytest.mark.parametrize("voice_tokens", [100, 600], ids=["voice turns leave budget over", "voice turns take all of it"])
def test_a_long_prefill_under_constant_voice_traffic_goes_first_every_few_steps(voice_tokens):
    """Every step has a new voice turn to prefill. The long prefill is left out of PASSED_OVER_MAX
    steps in a row, then goes first with one chunk (the voice turn sharing what it leaves), and so
    on: it is never starved, and no step holds more than one chunk of it."""
    planner, long = Planner(BUDGETS, encoder_layers=4), request(INTERACTIVE_TOKENS + 1000)
    plans = run_steps(planner, long, 3 * (PASSED_OVER_MAX + 1), voice_tokens)
    with_long = [i for i, plan in enumerate(plans) if long in plan]
    every = PASSED_OVER_MAX + 1
    assert with_long == [every - 1, 2 * every - 1, 3 * every - 1], f"steps that advanced the long prefill: {with_long}"
    assert long.fed == 3 * BUDGETS.prefill_chunk_tokens
    for i in with_long:
        assert plans[i][0] is long and len(plans[i]) == 2, "the overdue prefill goes first, the voice turn beside it"
        assert plans[i][1].step_tokens == min(voice_tokens, BUDGETS.prefill_step_tokens - BUDGETS.prefill_chunk_tokens)
    assert all(len(plan) == 1 and plan[0].interactive for i, plan in enumerate(plans) if i not in with_long)


def test_an_overdue_turn_that_cannot_start_holds_no_voice_turn_back():
    """A long turn not started yet is passed over like a started one; when it is overdue but its KV
    cache does not fit, the voice turns behind it still start (it went first for its work, not to
    change who is admitted)."""
    planner, long = Planner(BUDGETS, encoder_layers=4), request(INTERACTIVE_TOKENS + 1000, WAITING)
    plans = run_steps(planner, long, 2 * (PASSED_OVER_MAX + 1), 100,
                      admit=lambda r: r.interactive and started(r))
    assert all(len(plan) == 1 and plan[0].interactive for plan in plans), "every step started its voice turn"
    assert long.state == WAITING and long.passed_over >= PASSED_OVER_MAX
    long_fits = planner.plan([request(100, WAITING), long], started)
    assert long_fits[0] is long and long.state == PREFILLING and long.step_tokens == BUDGETS.prefill_chunk_tokens


def test_a_step_with_voice_work_takes_no_long_prefill_that_is_not_overdue():
    planner, long = Planner(BUDGETS, encoder_layers=4), request(INTERACTIVE_TOKENS + 1000)
    voice = request(100, WAITING)
    assert planner.plan([voice, long], started) == [voice] and long.passed_over == 1
    assert planner.plan([long], started) == [long] and long.passed_over == 0, "a step it takes part in resets the count"
