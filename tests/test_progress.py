"""Progress lines: the ETA counts the steps left at the rate of this process, also after a resume."""

from __future__ import annotations

from types import SimpleNamespace

from finetune import progress
from finetune.progress import TrainProgress


def test_eta_after_a_resume_uses_the_steps_this_process_did(monkeypatch, capsys):
    clock = iter([100.0, 110.0])  # train begins at 100 s; the log comes 10 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)
    bar = TrainProgress()
    state = SimpleNamespace(global_step=0, max_steps=200)
    bar.on_train_begin(None, state, None)  # transformers calls it before loading the checkpoint's state
    for step in range(81, 91):  # resumed at step 80: ten steps in 10 s, 110 to go
        state.global_step = step
        bar.on_step_end(None, state, None)
    bar.on_log(None, state, None, logs={"loss": 1.0})
    line = capsys.readouterr().err.strip()
    assert line.startswith("step 90/200") and line.endswith("elapsed 10 s  eta 110 s"), line
