"""The generation loop's torch threads: chosen by measuring decode steps (threads.py)."""

from __future__ import annotations

import torch

from model_service.generation.threads import StepThreads


def drive(chooser: StepThreads, cost_per_row, steps: int, rows: int = 8) -> list[int]:
    """Feed `steps` decode steps whose cost per row is cost_per_row(threads); the counts used."""
    used = []
    for _ in range(steps):
        threads = chooser.threads()
        used.append(threads)
        chooser.record(cost_per_row(threads) * rows, rows)
    return used


def test_keeps_the_count_whose_steps_cost_less_and_follows_a_change_of_load():
    chooser = StepThreads(available=2, period=20, probe=3)
    assert chooser.threads() == 2  # starts with every thread of the worker
    quiet = {1: 0.010, 2: 0.006}   # an idle node: two threads split the matrix products
    busy = {1: 0.012, 2: 0.040}    # cores shared with busy processes: threads wait on each other
    used = drive(chooser, busy.get, 60)
    assert chooser.current == 1 and used[-20:].count(2) <= 3  # switched early, only probes use 2 since
    used = drive(chooser, quiet.get, 60)
    assert chooser.current == 2 and used[-20:].count(1) <= 3
    used = drive(chooser, {1: 0.010, 2: 0.0098}.get, 60)  # within the margin: no flapping
    assert chooser.current == 2


def test_a_fixed_count_or_a_single_thread_worker_never_probes():
    for chooser, expected in ((StepThreads(available=4, fixed=3, period=2, probe=1), 3),
                              (StepThreads(available=1, period=2, probe=1), 1)):
        assert set(drive(chooser, {1: 1.0, 3: 5.0, 4: 0.1}.get, 30)) == {expected}


def test_a_step_runs_with_the_chosen_count_and_restores_the_workers():
    before = torch.get_num_threads()
    chooser = StepThreads(available=before + 1, fixed=before + 1)
    with chooser.step(rows=4):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
