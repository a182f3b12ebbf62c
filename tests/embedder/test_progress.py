"""Training progress within an epoch: a line every N steps or every T seconds, whichever comes first."""

from __future__ import annotations

from embedder.loop import Progress, ProgressLog


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_logged_every_n_steps_or_every_t_seconds_whichever_first():
    clock = Clock()
    reporter = ProgressLog(every_steps=10, every_s=30.0, epochs=2, per_epoch=20, clock=clock)
    progress = Progress()
    lines = []
    for step in range(1, 41):
        clock.now += 0.5 if step <= 20 else 4.0  # the second epoch is slow: time, not steps, triggers it
        progress.batch = (step - 1) % 20 + 1
        progress.epoch = (step - 1) // 20
        progress.global_step = step
        line = reporter.step(progress, images=32, loss=1.5)
        if line:
            lines.append((step, line))
    assert [s for s, _ in lines] == [10, 20, 28, 36]  # every 10 steps, then every 30 s (8 steps of 4 s)
    step, line = lines[0]
    assert line == "epoch 1/2 step 10/20 (25% of training): 64.0 images/s, loss 1.5000, ETA 0:15"
    assert lines[2][1].startswith("epoch 2/2 step 8/20 (70% of training): 8.0 images/s")
