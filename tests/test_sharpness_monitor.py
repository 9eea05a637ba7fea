"""``DivergenceMonitor(..., sharpness_every=N)`` and the readers of its sharpness (issue 16).

The monitored model is linear with MSE, whose Hessian is the constant
2/n [X 1]^T [X 1] of the batch: the recorded plain sharpness identifies the batch
that was probed, and the preconditioned one (Adagrad: P = eta (G + eps)^-1/2) the
optimizer state it was probed at, both against NumPy.  Row t holds the batch of
step t - 1 at the weights step t starts from (clippy_monitor.monitor.sharpness_probe).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from clippy_monitor import DivergenceMonitor, RecoveryConfig, hessian_top_eigenvalue, load_run
from clippy_monitor.monitor.detectors import DetectorConfig
from clippy_monitor.postmortem import postmortem, render_text
from clippy_monitor.postmortem.html import render_html
from clippy_monitor.record import LAYER_METRICS, RunWriter
from clippy_monitor.sharpness_reading import PRECONDITIONED, SHARPNESS, first_crossing

BATCH, EVERY, FULL_BATCHES, LAST = 8, 5, 23, 3  # 24 steps, the last one of 3 examples
PROBED = [5, 10, 15, 20]
LR = 0.1


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * FULL_BATCHES + LAST, 4)) * np.array([1.0, 2.0, 0.5, 1.5])
    y = x @ np.array([[1.0], [-0.5], [2.0], [0.3]]) + 0.1 * rng.normal(size=(len(x), 1))
    return x.astype("float32"), y.astype("float32")


def _model(optimizer: keras.optimizers.Optimizer, **compile_kwargs) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model


def _hessian(x: np.ndarray) -> np.ndarray:
    """The exact Hessian of the MSE of a linear model on batch ``x``: 2/n [X 1]^T [X 1]."""
    ones = np.column_stack([x.astype(np.float64), np.ones(len(x))])
    return 2.0 / len(x) * ones.T @ ones


def _batch(x: np.ndarray, step: int) -> np.ndarray:
    return x[step * BATCH : (step + 1) * BATCH]


class Snapshots(keras.callbacks.Callback):
    """Before each step t in ``steps`` (after the monitor's probe): the Adagrad accumulators
    and a direct ``hessian_top_eigenvalue`` on the batch of step t - 1."""

    def __init__(self, x: np.ndarray, y: np.ndarray, steps: list[int]) -> None:
        super().__init__()
        self.x, self.y, self.steps = x, y, steps
        self.accumulators: dict[int, np.ndarray] = {}
        self.direct: dict[int, tuple[float, float]] = {}

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if batch not in self.steps:
            return
        names = [f"{v.path.replace('/', '_')}_accumulator" for v in self.model.trainable_variables]
        found = {v.name: v.numpy() for v in self.model.optimizer.variables}
        self.accumulators[batch] = np.concatenate([found[n].ravel() for n in names])
        x, y = _batch(self.x, batch - 1), _batch(self.y, batch - 1)
        self.direct[batch] = tuple(
            hessian_top_eigenvalue(self.model, x, y, preconditioned=p).value for p in (False, True)
        )


def _fit(logdir: Path, model: keras.Model, callbacks=(), **monitor_kwargs) -> None:
    x, y = _data()
    monitor = DivergenceMonitor(logdir, tensorboard=False, **monitor_kwargs)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor, *callbacks])


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_recorded_sharpness_is_the_probe_on_the_last_batch(tmp_path, jit):
    x, y = _data()
    snapshots = Snapshots(x, y, PROBED)
    model = _model(keras.optimizers.Adagrad(LR), jit_compile=jit)
    _fit(tmp_path, model, [snapshots], sharpness_every=EVERY)
    run = load_run(tmp_path)
    np.testing.assert_array_equal(run.steps, np.arange(FULL_BATCHES + 1))
    plain, preconditioned = run.series(SHARPNESS), run.series(PRECONDITIONED)
    for values in (plain, preconditioned):
        np.testing.assert_array_equal(np.flatnonzero(~np.isnan(values)), PROBED)
    for t in PROBED:
        hessian = _hessian(_batch(x, t - 1))
        root = np.sqrt(LR / np.sqrt(snapshots.accumulators[t] + 1e-7))  # P^1/2, Keras' epsilon
        expected = (
            np.linalg.eigvalsh(hessian)[-1],
            np.linalg.eigvalsh(np.outer(root, root) * hessian)[-1],
        )
        np.testing.assert_allclose([plain[t], preconditioned[t]], expected, rtol=1e-4)
        np.testing.assert_allclose([plain[t], preconditioned[t]], snapshots.direct[t], rtol=1e-6)
    assert run.meta["sharpness_every"] == EVERY


def test_no_probe_no_series_and_the_probe_changes_nothing_else(tmp_path):
    runs, weights = [], []
    for name, every in (("probed", EVERY), ("plain", None)):
        model = _model(keras.optimizers.Adagrad(LR))
        _fit(tmp_path / name, model, sharpness_every=every)
        runs.append(load_run(tmp_path / name))
        weights.append([v.numpy() for v in model.variables + model.optimizer.variables])
    probed, plain = runs
    assert SHARPNESS not in plain.series_names and PRECONDITIONED not in plain.series_names
    assert plain.meta["sharpness_every"] is None
    assert probed.series_names == [*plain.series_names, SHARPNESS, PRECONDITIONED]
    np.testing.assert_array_equal(probed.steps, plain.steps)
    for name in plain.series_names:
        np.testing.assert_array_equal(probed.series(name), plain.series(name), err_msg=name)
    for metric in LAYER_METRICS:
        np.testing.assert_array_equal(probed.layer(metric), plain.layer(metric), err_msg=metric)
    for got, want in zip(*weights):
        np.testing.assert_array_equal(got, want)
    report = postmortem(tmp_path / "probed")["sharpness"]
    assert (report["status"], report["probes"], report["every"]) == ("not_crossed", 4, EVERY)
    assert report["peak"] == pytest.approx(np.nanmax(probed.series(PRECONDITIONED)))
    assert postmortem(tmp_path / "plain")["sharpness"]["status"] == "not_probed"


def test_adam_steps_per_execution(tmp_path):
    """Adam has no preconditioned sharpness (NaN); with steps_per_execution=4 the probe
    falls on the first step of an execution, on the batch kept at the step before a multiple
    of 5: rows 8, 12, 16, 20 hold the batches of steps 4, 9, 14, 19."""
    x, _ = _data()
    _fit(tmp_path, _model(keras.optimizers.Adam(0.01), steps_per_execution=4), sharpness_every=5)
    run = load_run(tmp_path)
    plain = run.series(SHARPNESS)
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(plain)), [8, 12, 16, 20])
    expected = [np.linalg.eigvalsh(_hessian(_batch(x, kept)))[-1] for kept in (4, 9, 14, 19)]
    np.testing.assert_allclose(plain[[8, 12, 16, 20]], expected, rtol=1e-4)
    assert np.all(np.isnan(run.series(PRECONDITIONED)))


def test_sequential_fits_keep_the_schedule(tmp_path):
    """fit per day (two fits of 12 steps): the second fit starts at step 12 and still probes
    rows 15 and 20; SGD's preconditioned sharpness is eta times the plain one."""
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.01))
    monitor = DivergenceMonitor(tmp_path, tensorboard=False, sharpness_every=EVERY)
    for day in (slice(0, 12 * BATCH), slice(12 * BATCH, 24 * BATCH)):
        model.fit(x[day], y[day], batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    run = load_run(tmp_path)
    np.testing.assert_array_equal(run.steps, np.arange(24))
    plain = run.series(SHARPNESS)
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(plain)), PROBED)
    expected = [np.linalg.eigvalsh(_hessian(_batch(x, t - 1)))[-1] for t in PROBED]
    np.testing.assert_allclose(plain[PROBED], expected, rtol=1e-4)
    np.testing.assert_allclose(run.series(PRECONDITIONED)[PROBED], 0.01 * plain[PROBED], rtol=1e-5)


@pytest.mark.parametrize("every", [0, -5, 2.5, True, "5"])
def test_sharpness_every_must_be_a_positive_int(tmp_path, every):
    with pytest.raises(ValueError, match="sharpness_every"):
        DivergenceMonitor(tmp_path, sharpness_every=every)


@pytest.mark.parametrize("onset_every", [0, 1.5, "2"])
def test_sharpness_onset_every_must_be_a_positive_int_with_sharpness_every(tmp_path, onset_every):
    with pytest.raises(ValueError, match="sharpness_onset_every"):
        DivergenceMonitor(tmp_path, sharpness_every=5, sharpness_onset_every=onset_every)
    with pytest.raises(ValueError, match="sharpness_onset_every needs sharpness_every"):
        DivergenceMonitor(tmp_path, sharpness_onset_every=2)


def _onset_fit(logdir: Path, onset_every: int | None) -> tuple[np.ndarray, np.ndarray]:
    """80 steps of SGD on a linear model whose targets jump x50 at step 30 and stay: an
    onset there, not recovered, decided (no_recovery) 20 steps after step-b."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80 * BATCH, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-0.5], [2.0], [0.3]])).astype("float32")
    y[30 * BATCH :] *= 50.0
    monitor = DivergenceMonitor(
        logdir,
        tensorboard=False,
        detector=DetectorConfig(warmup_steps=10, recovery_window=20),
        recovery=RecoveryConfig(check_every=5),
        sharpness_every=20,
        sharpness_onset_every=onset_every,
    )
    _model(keras.optimizers.SGD(0.001)).fit(
        x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor]
    )
    return x, y


def test_probing_is_denser_while_an_onset_is_open(tmp_path):
    """Every 20 steps, and every 2 from the first flush (every 5 steps) that sees the onset
    open until one flush period after the detector decided; each probe is the exact
    Hessian of the batch before its row."""
    x, _ = _onset_fit(tmp_path / "dense", onset_every=2)
    run = load_run(tmp_path / "dense")
    (event,) = [e for e in run.events if e["kind"] == "full"]
    step_b, decided = event["step_b"], event["step_b"] + 20
    assert 30 <= step_b <= 32
    probed = np.flatnonzero(~np.isnan(run.series(SHARPNESS)))
    dense = probed[(probed > step_b) & (probed <= decided + 5 + 2)]
    np.testing.assert_array_equal(np.diff(dense), 2)
    assert dense[0] <= step_b + 5 + 2 and dense[-1] >= decided
    rest = np.setdiff1d(probed, dense)
    np.testing.assert_array_equal(rest, [20, 60, 80][: len(rest)])
    assert rest[0] == 20 and 60 in rest
    expected = [np.linalg.eigvalsh(_hessian(_batch(x, t - 1)))[-1] for t in probed]
    np.testing.assert_allclose(run.series(SHARPNESS)[probed], expected, rtol=1e-4)
    assert run.meta["sharpness_onset_every"] == 2
    _onset_fit(tmp_path / "sparse", onset_every=None)
    sparse = load_run(tmp_path / "sparse")
    np.testing.assert_array_equal(np.flatnonzero(~np.isnan(sparse.series(SHARPNESS))), [20, 40, 60])


# --------------------------------------------------------------------------
# The reading: first crossing of 2 against step-b
# --------------------------------------------------------------------------
STEPS = np.arange(0, 100)
RISING = np.where(STEPS % 10 == 0, 0.05 * STEPS, np.nan)  # probed every 10 steps; 2.5 at 50


@pytest.mark.parametrize(
    "step_b, status, step, lead, peak, text",
    [
        (60, "before", 50, 10, 3.0,
         "crossed 2 at step 50 (2.5), 10 steps before step-b (60; 7 probes, max 3 up to it)"),
        (50, "before", 50, 0, 2.5,
         "crossed 2 at step 50 (2.5), 0 steps before step-b (50; 6 probes, max 2.5 up to it)"),
        (30, "after", 50, -20, 1.5,
         "did not cross 2 before step-b (30; 4 probes, max 1.5 up to it); "
         "first above it at step 50, 20 steps after"),
        (None, "crossed", 50, None, 4.5,
         "crossed 2 at step 50 (2.5; 10 probes, max 4.5; no step-b)"),
    ],
)  # fmt: skip
def test_first_crossing(step_b, status, step, lead, peak, text):
    crossing = first_crossing(STEPS, RISING, step_b)
    assert (crossing.status, crossing.step, crossing.lead, crossing.peak) == (
        status,
        step,
        lead,
        peak,
    )
    assert crossing.describe() == text


def test_first_crossing_without_one():
    low = first_crossing(STEPS, RISING / 10, 80)
    assert (low.status, low.step, low.probes) == ("not_crossed", None, 10)
    assert low.describe() == "did not cross 2 before step-b (80; 9 probes, max 0.4 up to it)"
    assert (
        first_crossing(STEPS, RISING / 10, None).describe()
        == "stayed below 2 (10 probes, max 0.45)"
    )
    none = first_crossing(STEPS, np.full(100, np.nan), 80)
    assert (none.status, none.describe(), none.peak) == ("not_probed", "not probed", None)


# --------------------------------------------------------------------------
# The post-mortem of a synthetic record
# --------------------------------------------------------------------------
SERIES = ["loss", "detector/status", "detector/since_onset", "detector/task"]
N, STEP_B, STEP_C = 200, 150, 170


def _synthetic(logdir: Path, sharpness: np.ndarray | None) -> Path:
    """A one-layer run that fully diverges at STEP_B..STEP_C, with ``sharpness`` as its
    preconditioned sharpness (and 100x it as the plain one) when given."""
    t = np.arange(N)
    loss = np.where(t >= STEP_B, 1.0 + 0.5 * (t - STEP_B), 1.0)
    status = np.where(t >= STEP_C, 2.1, np.where(t >= STEP_B, 1.0, 0.0))
    columns = [loss, status, np.where(t >= STEP_B, t - STEP_B, -1), np.where(t >= STEP_B, 0, -1)]
    names = SERIES + ([SHARPNESS, PRECONDITIONED] if sharpness is not None else [])
    if sharpness is not None:
        columns += [100 * sharpness, sharpness]
    stats = np.ones((N, len(LAYER_METRICS), 1), np.float32)
    meta = {"layers": ["w"], "layer_metrics": list(LAYER_METRICS), "series": names}
    meta |= {"detector_state_size": 0, "sharpness_every": 10 if sharpness is not None else None}
    event = {"kind": "full", "step_a": STEP_B - 1, "step_b": STEP_B, "step_c": STEP_C}
    with RunWriter(logdir, meta, tensorboard=False) as writer:
        writer.append(t, stats, np.column_stack(columns), None)
        writer.add_events([{**event, "recovered": None, "task": "loss", "reason": "no_recovery"}])
    return logdir


def test_postmortem_states_the_crossing_in_json_text_and_html(tmp_path):
    t = np.arange(N)
    values = np.where(t % 10 == 0, np.where(t >= 120, 2.4, 1.2), np.nan)
    path = _synthetic(tmp_path / "run", values)
    report = postmortem(path)
    assert report["sharpness"] == {
        "series": "preconditioned_sharpness",
        "threshold": 2.0,
        "status": "before",
        "probes": 20,
        "probes_to_step_b": 16,
        "step": 120,
        "value": pytest.approx(2.4),
        "step_b": STEP_B,
        "steps_before_step_b": 30,
        "peak": pytest.approx(2.4),
        "text": "crossed 2 at step 120 (2.4), 30 steps before step-b (150; 16 probes, max 2.4 up to it)",
        "every": 10,
    }
    json.dumps(report, allow_nan=False)
    assert (
        "sharpness preconditioned sharpness (probed every 10 steps): crossed 2 at step 120 (2.4), "
        "30 steps before step-b (150; 16 probes, max 2.4 up to it)"
    ) in render_text(report)
    page = render_html(load_run(path), report)
    figures = json.loads(page.split("const FIGURES = ", 1)[1].split(";\n", 1)[0])
    figure = figures["sharpness"]
    names = [trace["name"] for trace in figure["data"]]
    assert names == ["preconditioned sharpness", "sharpness"]
    assert figure["data"][0]["x"] == list(range(0, N, 10))
    assert {"y0": 2.0, "y1": 2.0, "yref": "y"}.items() <= figure["layout"]["shapes"][-1].items()


def test_postmortem_without_a_crossing_or_a_probe(tmp_path):
    t = np.arange(N)
    low = np.where(t % 10 == 0, np.where(t >= 160, 3.0, 0.8), np.nan)
    report = postmortem(_synthetic(tmp_path / "late", low))
    assert report["sharpness"]["status"] == "after"
    assert report["sharpness"]["steps_before_step_b"] == -10
    assert report["sharpness"]["text"] == (
        "did not cross 2 before step-b (150; 16 probes, max 0.8 up to it); "
        "first above it at step 160, 10 steps after"
    )
    path = _synthetic(tmp_path / "unprobed", None)
    report = postmortem(path)
    assert report["sharpness"]["status"] == "not_probed" and report["sharpness"]["every"] is None
    assert not any(line.startswith("sharpness") for line in render_text(report).splitlines())
    assert "plot_sharpness" not in render_html(load_run(path), report)
