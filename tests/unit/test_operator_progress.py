"""The progress channel: parsing `mmalign-progress {...}` lines from a log tail."""

from __future__ import annotations

from mmalign.api.progress import last_report, parse_line


def test_last_well_formed_line_wins() -> None:
    log = "\n".join([
        'mmalign-progress {"stage": "dpo", "step": 1, "total": 8, "loss": 0.7}',
        "[rank0] some DeepSpeed chatter",
        '2026-01-01 mmalign-progress {"stage": "dpo", "step": 4, "total": 8, "loss": 0.5, "eta_seconds": 12.4,'
        ' "epoch": 0, "metrics": {"reward_accuracy": 0.75, "bad": "x", "nan": NaN},'
        ' "checkpoint": "s3://b/dpo/checkpoints/step-4/"}',
        "mmalign-progress {not json",
    ])
    report = last_report(log, "dpo")
    assert report is not None
    assert (report.step, report.total, report.eta_seconds) == (4, 8, 12)
    assert report.all_metrics() == {"reward_accuracy": 0.75, "loss": 0.5, "epoch": 0.0}
    assert report.checkpoint == "s3://b/dpo/checkpoints/step-4/"
    assert report.summary() == "4/8 (50%)"


def test_other_stage_and_garbage_are_ignored() -> None:
    assert last_report('mmalign-progress {"stage": "reward", "step": 3, "total": 9}', "dpo") is None
    assert parse_line("hello") is None
    assert parse_line("mmalign-progress []") is None
    assert parse_line('mmalign-progress {"step": "x"}') is None
    report = parse_line('mmalign-progress {"step": 2, "total": 0, "loss": Infinity}')
    assert report is not None and report.loss is None and report.summary() == "2"


def test_progress_reads_back_off_while_node_0_serves_no_log() -> None:
    """A pod whose log cannot be read (kwok nodes serve none) is read again after 4, 8, 16, 32, then
    every 60 s, not every pass; the first read that succeeds restores the 2 s rhythm."""
    from mmalign.operator.controller import LoopSettings, next_poll_interval

    settings = LoopSettings()
    waits, interval = [], settings.progress_min_interval
    for _ in range(6):
        interval = next_poll_interval(interval, served=False, settings=settings)
        waits.append(interval)
    assert waits == [4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert next_poll_interval(60.0, served=True, settings=settings) == settings.progress_min_interval
