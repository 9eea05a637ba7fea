"""clippy_monitor.episodes: the Event type and the one reading of episodes off a record."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from clippy_monitor.episodes import (
    Event,
    detector_trace,
    events_of,
    open_episode,
    read_episodes,
)
from clippy_monitor.postmortem.analysis import EVENT_KEYS
from clippy_monitor.record import LiveRecord, load_run
from clippy_monitor.tensorboard_plugin.demo import DemoRun

# What EventTracker writes to clippy_events.jsonl.
MICRO = {
    "kind": "micro",
    "step_a": 99,
    "step_b": 100,
    "step_c": None,
    "recovered": 125,
    "confirmed_at": 101,
    "decided_at": None,
    "task": "loss/click",
    "reason": "spike",
}
FULL = {
    "kind": "full",
    "step_a": 199,
    "step_b": 200,
    "step_c": 260,
    "recovered": None,
    "confirmed_at": 201,
    "decided_at": 400,
    "task": "loss",
    "reason": "no_recovery",
}
DEAD = {
    "kind": "full",
    "step_a": None,
    "step_b": 1,
    "step_c": 9,
    "recovered": None,
    "confirmed_at": 9,
    "decided_at": 9,
    "task": None,
    "reason": "dead_layer",
}


@dataclasses.dataclass
class FakeRun:
    """The least a record must offer: steps, named series, events."""

    steps: np.ndarray
    columns: dict[str, np.ndarray]
    events: list[dict] = dataclasses.field(default_factory=list)

    @property
    def series_names(self) -> list[str]:
        return list(self.columns)

    def series(self, name: str) -> np.ndarray:
        return self.columns[name]


def fake_run(status, since, task, events=()) -> FakeRun:
    """Rows at steps 101, 102, ...; series: loss, loss/click, loss/like, then the detector's."""
    n = len(status)
    columns = {"loss": np.ones(n), "loss/click": np.ones(n), "loss/like": np.ones(n)}
    columns |= {
        "detector/status": np.array(status, float),
        "detector/since_onset": np.array(since, float),
        "detector/task": np.array(task, float),
    }
    return FakeRun(np.arange(101, 101 + n), columns, list(events))


# ------------------------------------------------------------------ Event


@pytest.mark.parametrize("record", [MICRO, FULL, DEAD])
def test_event_round_trip_is_the_record_dict(record):
    event = Event.from_record(record)
    assert event.to_record() == record
    assert list(event.to_record()) == list(record)  # same key order on disk
    assert Event.from_record(event.to_report(), "recorded") == event


def test_event_fields_and_task():
    micro = Event.from_record(MICRO)
    assert micro == Event(
        "micro",
        100,
        step_a=99,
        recovered=125,
        series="loss/click",
        reason="spike",
        source="recorded",
        confirmed_at=101,
    )
    assert (micro.series, micro.task) == ("loss/click", "click")
    assert Event.from_record(FULL).task is None  # the total loss is no task
    assert Event.from_record(DEAD).task is None
    assert Event.from_record(["not", "a", "dict"]) is None
    assert Event.from_record(FULL).decision_step == 400


def test_events_written_before_confirmed_at_and_decided_at_still_read():
    old = {k: v for k, v in FULL.items() if k not in ("confirmed_at", "decided_at")}
    event = Event.from_record(old)
    # Then step_c was the step the detector decided; the onset's confirmation is unknown.
    assert (event.step_b, event.step_c, event.decided_at, event.confirmed_at) == (
        200,
        260,
        260,
        None,
    )
    assert event.decision_step == 260
    old_micro = {k: v for k, v in MICRO.items() if k not in ("confirmed_at", "decided_at")}
    assert (Event.from_record(old_micro).decided_at, Event.from_record(old_micro).recovered) == (
        None,
        125,
    )


def test_event_report_shape():
    report = Event.from_record(MICRO, "status").to_report()
    assert tuple(report) == EVENT_KEYS
    assert report == {**MICRO, "task": "click", "series": "loss/click", "source": "status"}


def test_event_tolerates_what_the_reader_lets_through():
    event = Event.from_record(
        {"kind": "micro", "step_b": 5.0, "step_a": True, "task": 3, "reason": 7, "extra": 1}
    )
    assert (event.step_b, event.step_a, event.series, event.reason) == (5, None, None, None)
    assert Event.from_record({}).kind == "None"


def test_demo_record_events_load_unchanged(tmp_path):
    demo = DemoRun(n_steps=400, n_layers=4, micro=[100], full=300)
    run = load_run(demo.write(tmp_path / "demo", tensorboard=False))
    assert [e.to_record() for e in events_of(run)] == demo.events() == run.events
    live = LiveRecord(tmp_path / "demo")
    live.refresh()
    assert read_episodes(live) == read_episodes(run)  # both readers offer what episodes need
    assert [(e.kind, e.step_b, e.source) for e in read_episodes(run)] == [
        ("micro", 100, "recorded"),
        ("full", 300, "recorded"),
    ]


# ------------------------------------------------------------ episodes off the detector series


def test_full_divergence_from_the_status_series_alone():
    # healthy at 101..104, abnormal from 105, diverged (grad_collapse) at 109.
    status = [0, 0, 0, 0, 1, 1, 1, 1, 2.3, 2.3]
    since = [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]
    task = [-1, -1, -1, -1, 1, 1, 1, 1, 1, 1]
    (event,) = read_episodes(fake_run(status, since, task))
    assert event == Event(
        "full",
        105,
        step_a=104,
        step_c=109,
        series="loss/click",
        reason="grad_collapse",
        source="status",
        confirmed_at=105,
        decided_at=109,
    )
    recorded = {**FULL, "step_a": 104, "step_b": 105, "step_c": 109}
    assert read_episodes(fake_run(status, since, task, [recorded])) == [Event.from_record(recorded)]


def test_no_recovery_from_the_status_series_dates_step_c_where_the_loss_levels_off():
    # Rows 101..112: confirmed abnormal at 105 with the onset back-dated to 103, the loss
    # climbs to its divergent level 10 at 107, and the detector decides at 112.
    status = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2.1]
    since = [-1, -1, -1, -1, 2, 3, 4, 5, 6, 7, 8, 9]
    task = [-1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0]
    run = fake_run(status, since, task)
    run.columns["loss"] = np.array([1, 1, 1.5, 2, 4, 7, 10, 10, 9.5, 10, 10.5, 10], float)
    (event,) = read_episodes(run)
    assert (event.step_a, event.step_b, event.confirmed_at, event.step_c, event.decided_at) == (
        102,
        103,
        105,
        107,
        112,
    )


def test_open_episode_at_the_last_row():
    status = [0, 0, 1, 0, 0, 0, 1, 1, 1]
    since = [-1, -1, 0, -1, -1, -1, 0, 1, 2]
    task = [-1, -1, 2, -1, -1, -1, 2, 2, 2]
    micro = {**MICRO, "step_a": 102, "step_b": 103, "recovered": 104, "task": "loss/like"}
    run = fake_run(status, since, task, [micro])
    opened = Event(
        "open",
        107,
        step_a=106,
        series="loss/like",
        reason="spike",
        source="status",
        confirmed_at=107,
    )
    assert read_episodes(run) == [Event.from_record(micro), opened]
    assert open_episode(run) == opened
    assert open_episode(fake_run(status[:6], since[:6], task[:6])) is None


def test_micro_divergences_only():
    status, since, task = [0, 1, 1, 0, 0], [-1, 0, 1, -1, -1], [-1, 1, 1, -1, -1]
    micro = {**MICRO, "step_a": 101, "step_b": 102, "recovered": 104}
    assert read_episodes(fake_run(status, since, task, [micro])) == [Event.from_record(micro)]
    assert (
        read_episodes(fake_run(status, since, task)) == []
    )  # recovered: only the events file tells


def test_impossible_detector_values_are_masked():
    # status 7 and inf read as healthy; since_onset 1e308 and NaN are unknown (the onset is then
    # the first row of the abnormal run); task 9 is no series.
    status = [0, 7, np.inf, 0, 1, 1, 1]
    since = [-1, -1, -1, -1, 0, 1, 1e308]
    task = [-1, -1, -1, -1, 1, 1, 9]
    run = fake_run(status, since, task)
    trace = detector_trace(run)
    assert [note.split(":")[0] for note in trace.ignored] == [
        "detector/status",
        "detector/since_onset",
        "detector/task",
    ]
    assert trace.ignored[0] == "detector/status: 2 impossible value(s), first 7 at step 102"
    np.testing.assert_array_equal(trace.status, [0, 0, 0, 0, 1, 1, 1])
    (event,) = read_episodes(run, trace)
    assert event == Event(
        "open", 105, step_a=104, series=None, reason="spike", source="status", confirmed_at=105
    )
    since[-1] = np.nan
    assert read_episodes(fake_run(status, since, task)) == [event]


def test_no_detector_series_means_the_recorded_events_only():
    run = FakeRun(np.arange(1, 4), {"loss": np.ones(3)}, [FULL, MICRO])
    assert detector_trace(run) is None
    assert read_episodes(run) == [Event.from_record(MICRO), Event.from_record(FULL)]


def test_importing_episodes_does_not_import_tensorflow():
    code = "import sys, clippy_monitor.episodes; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
