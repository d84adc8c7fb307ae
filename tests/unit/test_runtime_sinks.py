"""Metric sinks: CSV columns grow and resume truncates; disabled sinks write nothing."""

import csv

from iddpm.runtime import CSVSink, make_sinks
from iddpm.runtime.sinks import ConsoleSink


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_columns_grow(tmp_path):
    p = tmp_path / "metrics.csv"
    s = CSVSink(p)
    s.write(10, {"loss": 1.0})
    s.write(20, {"loss": 0.5, "loss_q3": 2.0})
    rows = _rows(p)
    assert [r["step"] for r in rows] == ["10", "20"]
    assert rows[0]["loss_q3"] == "" and float(rows[1]["loss_q3"]) == 2.0


def test_csv_resume_drops_later_rows_and_fresh_run_overwrites(tmp_path):
    p = tmp_path / "metrics.csv"
    s = CSVSink(p)
    for step in (10, 20, 30):
        s.write(step, {"loss": float(step)})
    CSVSink(p, resume_step=20).write(30, {"loss": -1.0})
    rows = _rows(p)
    assert [(r["step"], float(r["loss"])) for r in rows] == [("10", 10.0), ("20", 20.0), ("30", -1.0)]
    CSVSink(p).write(1, {"loss": 3.0})
    assert [r["step"] for r in _rows(p)] == ["1"]


def test_make_sinks(tmp_path):
    assert make_sinks(tmp_path, enabled=False).sinks == []
    sinks = make_sinks(tmp_path, enabled=True, tensorboard=False)
    assert any(isinstance(s, ConsoleSink) for s in sinks.sinks)
    sinks.write(1, {"loss": 0.25})
    sinks.close()
    assert float(_rows(tmp_path / "metrics.csv")[0]["loss"]) == 0.25


def _tb_scalars(log_dir) -> dict:
    """tag -> [(step, value)] as TensorBoard reads them back (later sessions purge the steps they rewrite)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_sink_writes_events(tmp_path):
    import pytest

    pytest.importorskip("tensorboard")
    sinks = make_sinks(tmp_path, enabled=True, console=False)
    sinks.write(1, {"loss": 0.25})
    sinks.write(2, {"loss": 0.5, "lr": 1e-3})
    sinks.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    f32 = pytest.approx  # TensorBoard stores float32
    assert _tb_scalars(tmp_path / "tb") == {"loss": [(1, 0.25), (2, 0.5)], "lr": [(2, f32(1e-3, rel=1e-7))]}
    # a resumed run (from step 1) replaces what the first run logged after its checkpoint, as the CSV does
    sinks = make_sinks(tmp_path, enabled=True, console=False, resume_step=1)
    sinks.write(2, {"loss": -1.0})
    sinks.close()
    after = _tb_scalars(tmp_path / "tb")
    assert after["loss"] == [(1, 0.25), (2, -1.0)] and after.get("lr", []) == []
