"""The divergence detector: exact event steps on injected divergences, silence on
benign series (noise, day-boundary level shifts, the steep start), chunked event
tracking, the XLA-compiled per-step path against the offline run, and speed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from clippy_monitor.monitor.detectors import (
    DetectorConfig,
    DivergenceDetector,
    EventTracker,
    dead_layer_signal,
    decode_status,
    detect_divergence,
    detector_outputs,
)

WINDOW = DetectorConfig().recovery_window


# --------------------------------------------------------------------------
# Synthetic series
# --------------------------------------------------------------------------
def healthy_loss(
    seed: int,
    *,
    days: int = 10,
    steps_per_day: int = 500,
    sigma: float = 0.15,
    num_tasks: int = 0,
) -> np.ndarray:
    """Sequential training: a steep start, a slow downward trend, a level shift
    x U(0.75, 1.35) at each day boundary, lognormal minibatch noise."""
    rng = np.random.default_rng(seed)
    n = days * steps_per_day
    t = np.arange(n)
    trend = 0.5 * (1.0 + 4.0 * np.exp(-t / 150.0)) * (1.0 - 0.3 * t / n)
    level = np.repeat(
        np.concatenate([[1.0], rng.uniform(0.75, 1.35, days - 1)]).cumprod(), steps_per_day
    )
    if num_tasks:
        weights = rng.uniform(0.2, 1.0, num_tasks)
        noise = np.exp(rng.normal(0.0, sigma, (n, num_tasks)))
        return (trend * level)[:, None] * weights * noise
    return trend * level * np.exp(rng.normal(0.0, sigma, n))


def flat_loss(seed: int, n: int = 2000, sigma: float = 0.15, num_tasks: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, num_tasks) if num_tasks else (n,)
    return 0.6 * np.exp(rng.normal(0.0, sigma, shape))


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
def test_config_round_trip_and_validation() -> None:
    cfg = DetectorConfig(spike_ratio=2.5, recovery_window=77)
    d = cfg.to_dict()
    assert d["spike_ratio"] == 2.5 and d["recovery_window"] == 77
    assert DetectorConfig.from_dict(d) == cfg
    assert set(d) == {f.name for f in dataclasses.fields(DetectorConfig)}
    with pytest.raises(TypeError, match="bogus"):
        DetectorConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="spike_ratio"):
        DetectorConfig(spike_ratio=0.9)
    with pytest.raises(ValueError, match="recovery_ratio"):
        DetectorConfig(recovery_ratio=3.0)  # above spike_ratio: no hysteresis
    with pytest.raises(TypeError, match="warmup_steps"):
        DetectorConfig(warmup_steps=2.5)


def test_unknown_threshold_raises_type_error_naming_it() -> None:
    loss = flat_loss(0, n=100)
    with pytest.raises(TypeError, match="spike_ratoi"):
        detect_divergence(loss, spike_ratoi=3.0)
    with pytest.raises(TypeError, match="window"):
        detector_outputs(loss, window=10)


def test_decode_status() -> None:
    assert decode_status(0.0) == (0, None)
    assert decode_status(1.0) == (1, None)
    assert decode_status(np.float32(2.1)) == (2, "no_recovery")
    assert decode_status(np.float32(2.2)) == (2, "non_finite")
    assert decode_status(np.float32(2.3)) == (2, "grad_collapse")
    assert decode_status(np.float32(2.4)) == (2, "dead_layer")


def test_state_vector_layout() -> None:
    det = DivergenceDetector(4)
    assert det.state_size == 10 + 3 * 4
    s = det.initial_state()
    assert s.dtype == tf.float32 and s.shape == (det.state_size,)
    layout = det.state_layout()
    assert layout["dead_run"] == slice(9, 10)
    assert layout["baseline"] == slice(10, 14) and layout["deviation"] == slice(14, 18)
    assert layout["out_run"] == slice(18, 22)
    s = s.numpy()
    assert (
        s[layout["status"]][0] == 0
        and s[layout["since_onset"]][0] == -1
        and s[layout["task"]][0] == -1
    )


# --------------------------------------------------------------------------
# Micro divergence
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seed,mult,duration",
    [(0, 3.0, 5), (1, 4.0, 12), (2, 10.0, 20), (3, 6.0, 8)],
)
def test_micro_spike_exact_steps(seed: int, mult: float, duration: int) -> None:
    loss = healthy_loss(seed)
    k = 2200 + 37 * seed  # mid-day, away from a day boundary
    loss[k : k + duration] *= mult
    events = detect_divergence(loss)
    assert events == [
        {
            "kind": "micro",
            "step_a": k - 1,
            "step_b": k,
            "step_c": None,
            "recovered": k + duration,
            "confirmed_at": k + 1,  # the second exceeding step (confirm_steps = 2)
            "decided_at": None,
            "task": "total",
            "reason": "spike",
        }
    ]


def test_micro_spike_uses_caller_step_numbers() -> None:
    loss = flat_loss(5)
    loss[800:810] *= 5.0
    steps = np.arange(len(loss)) + 120_000
    (event,) = detect_divergence(loss, steps=steps, series_names=["loss"])
    assert (event["step_a"], event["step_b"], event["recovered"]) == (120_799, 120_800, 120_810)
    assert event["task"] == "loss"


def test_micro_spike_names_the_task_that_moved_first() -> None:
    loss = healthy_loss(7, num_tasks=4, days=4)
    k = 1234
    loss[k : k + 15, 2] *= 6.0  # task 2 first ...
    loss[k + 3 : k + 9, 0] *= 4.0  # ... task 0 follows three steps later
    loss[k + 3 : k + 9, 3] *= 3.0
    events = detect_divergence(loss, series_names=["ctr", "watch", "like", "share"])
    assert events == [
        {
            "kind": "micro",
            "step_a": k - 1,
            "step_b": k,
            "step_c": None,
            "recovered": k + 15,
            "confirmed_at": k + 1,
            "decided_at": None,
            "task": "like",
            "reason": "spike",
        }
    ]
    # Per-step outputs: since_onset counts from step_b, the task is the series index.
    out = detector_outputs(loss)
    assert np.all(out[: k - 1, 0] == 0) and np.all(out[: k - 1, 1] == -1)
    assert np.all(out[k + 1 : k + 15, 0] == 1)
    np.testing.assert_array_equal(out[k + 1 : k + 15, 1], np.arange(1, 15))
    assert np.all(out[k + 1 : k + 15, 2] == 3)  # column 3 = task index 2
    assert out[k + 15].tolist() == [0.0, -1.0, -1.0]


def test_single_step_outlier_is_not_an_event_unless_confirm_steps_is_1() -> None:
    loss = flat_loss(11)
    loss[900] *= 8.0
    assert detect_divergence(loss) == []
    (event,) = detect_divergence(loss, confirm_steps=1)
    assert (event["step_b"], event["recovered"]) == (900, 901)
    out = detector_outputs(loss, confirm_steps=1)
    assert out[900].tolist() == [1.0, 0.0, 0.0]  # since_onset 0 at step_b


# --------------------------------------------------------------------------
# Full divergence
# --------------------------------------------------------------------------
def test_full_divergence_without_recovery() -> None:
    loss = healthy_loss(3, days=4)
    k = 1300
    loss[k:] *= 5.0
    events = detect_divergence(loss)
    assert events == [
        {
            "kind": "full",
            "step_a": k - 1,
            "step_b": k,
            "step_c": k,  # the loss jumped to its divergent level at once
            "recovered": None,
            "confirmed_at": k + 1,
            "decided_at": k + WINDOW,  # no recovery within recovery_window steps of step-b
            "task": "total",
            "reason": "no_recovery",
        }
    ]
    out = detector_outputs(loss)
    assert np.all(out[k + WINDOW :, 0] >= 2)  # absorbing
    (event,) = detect_divergence(loss, recovery_window=50)
    assert (event["step_b"], event["step_c"], event["decided_at"]) == (k, k, k + 50)


def climbing_loss(start: int, slope: float, n: int = 1500) -> np.ndarray:
    """Healthy noise around 1, then from ``start`` a linear climb of ``slope`` per step."""
    loss = np.exp(np.random.default_rng(0).normal(0.0, 0.05, n))
    loss[start:] += slope * (np.arange(n - start) + 1)
    return loss


def test_a_linear_climb_is_back_dated_to_where_it_left_the_healthy_band() -> None:
    (event,) = detect_divergence(climbing_loss(300, 0.12))
    # Before back-dating, step_b was 309: the first of the two steps above the spike
    # threshold; the onset is still confirmed at the second of them.
    assert event["confirmed_at"] == 310
    assert 300 <= event["step_b"] <= 302 and event["step_a"] == event["step_b"] - 1
    assert event["decided_at"] == event["step_b"] + WINDOW
    # The look-back bounds it; 0 restores the first-exceeding-step onset.
    (event,) = detect_divergence(climbing_loss(300, 0.12), onset_lookback=3)
    assert event["step_b"] == 310 - 3
    (event,) = detect_divergence(climbing_loss(300, 0.12), onset_lookback=0)
    assert (event["step_b"], event["confirmed_at"]) == (309, 310)


def test_a_ramped_micro_spike_starts_at_its_ramp_and_keeps_its_recovery_step() -> None:
    loss = flat_loss(4, sigma=0.05)
    k = 800
    loss[k : k + 4] *= [1.5, 2.2, 3.0, 4.0]  # ramps up over four steps ...
    loss[k + 4 : k + 12] *= 5.0  # ... peaks, then recovers at k + 12
    (event,) = detect_divergence(loss)
    assert (event["kind"], event["step_b"], event["recovered"]) == ("micro", k, k + 12)
    assert event["confirmed_at"] == k + 2  # the second step above 2x the baseline


def test_the_onset_is_back_dated_on_the_task_that_moved_first_only() -> None:
    base = flat_loss(12, sigma=0.05, num_tasks=3)
    k = 900
    base[k : k + 10, 2] *= 5.0  # task 2 spikes at k
    noisy = base.copy()
    noisy[k - 1, 0] *= 1.6  # another task's noisy step just before: above its band only
    (event,) = detect_divergence(noisy)
    assert (event["step_b"], event["task"]) == (k, "task_2")
    rising = base.copy()
    rising[k - 1, 2] *= 1.6  # the same task already out of its band a step earlier
    (event,) = detect_divergence(rising)
    assert (event["step_b"], event["task"], event["confirmed_at"]) == (k - 1, "task_2", k + 1)


def test_no_recovery_step_c_is_where_the_loss_reaches_its_divergent_level() -> None:
    loss = flat_loss(9, sigma=0.05)
    k = 1000  # climbs over 20 steps to a plateau of 10x and stays there
    loss[k : k + 20] *= 1.0 + 9.0 * (np.arange(20) + 1) / 20
    loss[k + 20 :] *= 10.0
    (event,) = detect_divergence(loss)
    assert event["reason"] == "no_recovery"
    assert k <= event["step_b"] <= k + 2
    assert k + 16 <= event["step_c"] <= k + 20  # the plateau is reached at k + 19
    assert event["decided_at"] == event["step_b"] + WINDOW


def test_partial_recovery_above_the_recovery_threshold_is_full() -> None:
    loss = flat_loss(4, sigma=0.05)
    loss[700:720] *= 6.0
    loss[720:] *= 1.8  # under the spike threshold, never back under 1.2x the baseline
    (event,) = detect_divergence(loss)
    assert (event["kind"], event["step_b"], event["decided_at"]) == ("full", 700, 700 + WINDOW)
    assert event["step_c"] == 720  # the spike came back down to the level it stayed at


def test_nan_loss_is_full_divergence_at_that_step() -> None:
    loss = healthy_loss(2, days=3)
    k = 1111
    loss[k] = np.nan
    loss[k + 1 :] = loss[k + 1 :]  # finite again afterwards: still absorbing
    events = detect_divergence(loss)
    assert events == [
        {
            "kind": "full",
            "step_a": k - 1,
            "step_b": k,
            "step_c": k,
            "recovered": None,
            "confirmed_at": k,
            "decided_at": k,
            "task": "total",
            "reason": "non_finite",
        }
    ]
    out = detector_outputs(loss)
    assert np.all(out[k:, 0] >= 2) and np.all(out[:k, 0] == 0)


def test_non_finite_task_grads_and_warmup() -> None:
    loss = flat_loss(6, n=1500, num_tasks=3)
    loss[900, 1] = np.inf
    (event,) = detect_divergence(loss)
    assert (event["kind"], event["step_b"], event["step_c"], event["task"], event["reason"]) == (
        "full",
        900,
        900,
        "task_1",
        "non_finite",
    )
    # Non-finite gradients with finite losses: no task to blame.
    grad_norm = np.ones(1500, np.float32)
    grad_norm[1000] = np.nan
    (event,) = detect_divergence(flat_loss(6, n=1500, num_tasks=3), grad_norm)
    assert (event["step_b"], event["step_c"], event["task"], event["reason"]) == (
        1000,
        1000,
        None,
        "non_finite",
    )
    # During warm-up too; and at the very first step there is no step_a.
    early = flat_loss(1, n=1500)
    early[3] = np.nan
    assert detect_divergence(early)[0]["step_b"] == 3
    early[0] = np.nan
    (event,) = detect_divergence(early)
    assert (event["step_a"], event["step_b"], event["step_c"]) == (None, 0, 0)


def test_grad_norm_collapse_while_loss_is_high() -> None:
    rng = np.random.default_rng(8)
    loss = flat_loss(8)
    grad_norm = np.exp(rng.normal(0.0, 0.3, len(loss))).astype(np.float32)
    k = 1000
    loss[k:] *= 6.0
    grad_norm[k : k + 30] *= 20.0  # the norm grows at step-b ...
    grad_norm[k + 30 :] = 1e-5  # ... and collapses (dying ReLU)
    events = detect_divergence(loss, grad_norm)
    assert events == [
        {
            "kind": "full",
            "step_a": k - 1,
            "step_b": k,
            "step_c": k + 30,
            "recovered": None,
            "confirmed_at": k + 1,
            "decided_at": k + 30,  # the collapse is both the decision and step-c
            "task": "total",
            "reason": "grad_collapse",
        }
    ]
    # A small gradient norm while the loss is healthy is not a divergence.
    quiet = np.ones(len(loss), np.float32)
    quiet[1500:] = 1e-6
    assert detect_divergence(flat_loss(8), quiet) == []


def test_non_finite_never_poisons_the_baseline() -> None:
    det = DivergenceDetector(2, DetectorConfig(warmup_steps=5))
    state = det.initial_state()
    for i in range(20):
        state, _ = det.step(
            state, tf.constant([1.0 + 0.01 * i, 1.0]), tf.constant(1.0), tf.constant(True)
        )
    base_before = state.numpy()[det.state_layout()["baseline"]].copy()
    state, out = det.step(
        state, tf.constant([np.nan, np.inf]), tf.constant(np.nan), tf.constant(False)
    )
    assert decode_status(out.numpy()[0]) == (2, "non_finite")
    np.testing.assert_array_equal(state.numpy()[det.state_layout()["baseline"]], base_before)
    assert np.all(np.isfinite(state.numpy()))
    state, out = det.step(state, tf.constant([1.0, 1.0]), tf.constant(1.0), tf.constant(True))
    assert out.numpy()[0] >= 2  # absorbing


# --------------------------------------------------------------------------
# Benign series: no events
# --------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.1, 0.15, 0.2])
def test_day_boundary_level_shifts_and_noise_are_not_divergence(sigma: float) -> None:
    for seed in range(6):
        assert detect_divergence(healthy_loss(seed, sigma=sigma)) == [], (sigma, seed)


def test_day_boundary_level_shifts_multitask_are_not_divergence() -> None:
    for seed in range(4):
        assert detect_divergence(healthy_loss(100 + seed, num_tasks=4)) == [], seed


def test_steep_start_of_training_is_not_divergence() -> None:
    t = np.arange(3000)
    rng = np.random.default_rng(21)
    for trend in (
        0.3 + 10.0 * np.exp(-t / 30.0),  # very steep
        0.3 + 5.0 * np.exp(-np.maximum(t - 40, 0) / 60.0),  # flat, then a drop
        0.3 + 3.0 / (1.0 + t / 5.0),  # power law
    ):
        loss = trend * np.exp(rng.normal(0.0, 0.15, len(t)))
        assert detect_divergence(loss) == []


def test_level_shift_is_absorbed_and_later_spikes_still_found() -> None:
    loss = flat_loss(9, n=3000, sigma=0.1)
    loss[1000:] *= 1.35  # stays: the baseline adapts
    loss[2000:2010] *= 4.0
    (event,) = detect_divergence(loss)
    assert (event["kind"], event["step_b"], event["recovered"]) == ("micro", 2000, 2010)


# --------------------------------------------------------------------------
# EventTracker
# --------------------------------------------------------------------------
def _episodes_series() -> tuple[np.ndarray, np.ndarray]:
    loss = flat_loss(12, n=3000, num_tasks=2)
    loss[600:610, 1] *= 8.0  # micro, task_1
    loss[1200:1260, :] *= 5.0  # micro, long
    loss[2000:, 0] *= 6.0  # full, task_0
    steps = np.arange(len(loss)) + 5000
    return loss, steps


def test_event_tracker_chunks_equal_one_batch() -> None:
    loss, steps = _episodes_series()
    out = detector_outputs(loss)
    names = ["total", "task_0", "task_1"]
    whole = EventTracker(names).update(steps, out)
    assert [(e["kind"], e["step_b"], e["recovered"]) for e in whole] == [
        ("micro", 5600, 5610),
        ("micro", 6200, 6260),
        ("full", 7000, None),
    ]
    assert whole[0]["task"] == "task_1" and whole[2]["task"] == "task_0"
    assert whole[2]["step_c"] == 7000 + WINDOW and whole[2]["reason"] == "no_recovery"
    rng = np.random.default_rng(0)
    cuts = set(rng.integers(1, len(steps), 150).tolist()) | {600, 601, 1201, 2001, 2000 + WINDOW}
    one_by_one = (
        set(range(590, 615))
        | set(range(1195, 1205))
        | set(range(1995, 2005))
        | set(range(2195, 2205))
    )
    for bounds in (
        sorted(cuts),
        sorted(one_by_one),
    ):  # random chunks; single rows around the episodes
        tracker = EventTracker(names)
        events = []
        for lo, hi in zip([0, *bounds], [*bounds, len(steps)]):
            events += tracker.update(steps[lo:hi], out[lo:hi])
        events += tracker.finish()
        assert events == whole


def test_event_tracker_pending_and_finish() -> None:
    loss = flat_loss(13)
    loss[1900:] *= 5.0  # still abnormal when the series ends
    steps = np.arange(len(loss))
    out = detector_outputs(loss)
    tracker = EventTracker(["total"])
    assert tracker.update(steps[:1901], out[:1901]) == []  # onset, not confirmed yet
    assert tracker.pending() is None
    assert tracker.update(steps[1901:], out[1901:]) == []
    assert tracker.finish() == []  # an open episode is not an event ...
    pending = tracker.pending()  # ... it is reported here
    assert pending["kind"] == "micro-in-progress"
    assert (pending["step_a"], pending["step_b"], pending["task"]) == (1899, 1900, "total")
    assert pending["since_onset"] == 99 and pending["last_step"] == 1999
    assert detect_divergence(loss) == []


# --------------------------------------------------------------------------
# The compiled per-step path
# --------------------------------------------------------------------------
def test_jit_compiled_step_matches_offline_and_resumes_from_a_snapshot() -> None:
    loss = flat_loss(14, n=700, num_tasks=2)
    loss[300:312, 1] *= 7.0
    loss[500:, :] *= 4.0
    rng = np.random.default_rng(1)
    grad_norm = np.exp(rng.normal(0.0, 0.2, len(loss))).astype(np.float32)
    grad_norm[560:] = 1e-6
    series = np.concatenate([loss.sum(1, keepdims=True), loss], 1).astype(np.float32)

    det = DivergenceDetector(3)
    state = tf.Variable(det.initial_state())

    @tf.function(jit_compile=True)
    def train_step(losses: tf.Tensor, norm: tf.Tensor, finite: tf.Tensor) -> tf.Tensor:
        new_state, out = det.step(state, losses, norm, finite)
        state.assign(new_state)
        return out

    def run(lo: int, hi: int) -> np.ndarray:
        rows = [train_step(series[i], grad_norm[i], tf.constant(True)) for i in range(lo, hi)]
        return np.stack([r.numpy() for r in rows])

    online = run(0, 350)
    snapshot = state.numpy()
    online = np.concatenate([online, run(350, len(loss))])
    offline = detector_outputs(loss, grad_norm)
    np.testing.assert_array_equal(online, offline)
    events = EventTracker(["total", "task_0", "task_1"]).update(np.arange(len(loss)), online)
    assert [(e["kind"], e["step_b"], e["step_c"], e["reason"]) for e in events] == [
        ("micro", 300, None, "spike"),
        ("full", 500, 560, "grad_collapse"),
    ]
    state.assign(snapshot)  # resume
    np.testing.assert_array_equal(run(350, len(loss)), offline[350:])


def test_scan_in_chunks_with_padding_equals_one_pass() -> None:
    """What the monitor does at each flush: the buffered rows, padded to a fixed
    length with invalid rows, continuing from the previous flush's state."""
    loss = flat_loss(15, n=700, num_tasks=2)
    loss[200:210, 0] *= 6.0
    loss[420:, :] *= 5.0
    series = np.concatenate([loss.sum(1, keepdims=True), loss], 1).astype(np.float32)
    grad_norm = np.ones(len(loss), np.float32)
    det = DivergenceDetector(3)
    scan = tf.function(det.scan, jit_compile=True)
    capacity, state, outputs = 256, det.initial_state(), []
    for lo in range(0, len(loss), 150):  # flushes of 150 rows in a 256-row buffer
        n = min(150, len(loss) - lo)
        pad = capacity - n
        state, out = scan(
            state,
            np.concatenate(
                [series[lo : lo + n], np.full((pad, 3), 1e9, np.float32)]
            ),  # padding would be a spike
            np.concatenate([grad_norm[lo : lo + n], np.zeros(pad, np.float32)]),
            np.ones(capacity, bool),
            np.arange(capacity) < n,
        )
        outputs.append(out.numpy()[:n])
    np.testing.assert_array_equal(np.concatenate(outputs), detector_outputs(loss, grad_norm))
    events = EventTracker(["total", "task_0", "task_1"]).update(
        np.arange(len(loss)), np.concatenate(outputs)
    )
    assert [(e["kind"], e["step_b"], e["step_c"]) for e in events] == [
        ("micro", 200, None),
        ("full", 420, 420 + WINDOW),
    ]


def test_offline_100k_steps_with_one_spike() -> None:
    # Speed is measured in benchmarks/detector_speed.py, not asserted here.
    loss = healthy_loss(0, days=20, steps_per_day=5000)  # 100k steps
    loss[70_000:70_010] *= 6.0
    events = detect_divergence(loss)
    assert [(e["kind"], e["step_b"]) for e in events] == [("micro", 70_000)]


# --------------------------------------------------------------------------
# Dead layer (paper 4.1: the ReLU units of a layer die)
# --------------------------------------------------------------------------
def zero_shares(n: int, layers: int = 3, seed: int = 0) -> np.ndarray:
    """Healthy zero-gradient shares: ReLU layers have 2-20% exact zeros."""
    return np.random.default_rng(seed).uniform(0.02, 0.2, (n, layers)).astype(np.float32)


def test_dead_layer_signal_needs_a_layer_that_was_alive() -> None:
    zero = zero_shares(8, layers=3)
    zero[:, 2] = 1.0  # never gets a gradient (an unused variable): never dead
    zero[5:, 0] = 1.0  # alive for 5 steps, then every entry zero
    dead, alive = dead_layer_signal(zero, np.zeros(3, bool), 0.99)
    np.testing.assert_array_equal(dead.numpy(), [False] * 5 + [True] * 3)
    np.testing.assert_array_equal(alive.numpy(), [True, True, False])
    # In two chunks, carrying `alive`, the signal is the same; padding rows count for nothing.
    first, alive = dead_layer_signal(zero[:4], np.zeros(3, bool), 0.99)
    padded = np.concatenate([zero[4:], np.zeros((3, 3), np.float32)])
    second, _ = dead_layer_signal(padded, alive, 0.99, valid=np.arange(7) < 4)
    np.testing.assert_array_equal(np.concatenate([first.numpy(), second.numpy()[:4]]), dead.numpy())
    assert not second.numpy()[4:].any()


def test_dead_layer_is_a_full_divergence_from_its_first_dead_step() -> None:
    loss = healthy_loss(0, days=2)  # 1000 steps, with a day-boundary shift, no spike
    zero = zero_shares(len(loss))
    zero[600:, 1] = 1.0  # layer 1 dies at step 600 while the loss stays normal
    events = detect_divergence(loss, zero_grad_fraction=zero)
    steps = DetectorConfig().dead_layer_steps
    assert [(e["kind"], e["reason"], e["step_a"], e["step_b"], e["step_c"]) for e in events] == [
        ("full", "dead_layer", 599, 600, 600 + steps - 1)
    ]
    assert detect_divergence(loss) == []  # the loss alone shows nothing
    assert detect_divergence(loss, zero_grad_fraction=zero, dead_layer_steps=0) == []  # disabled


def test_dead_layer_for_fewer_steps_than_dead_layer_steps_is_no_event() -> None:
    loss = healthy_loss(1, days=2)
    zero = zero_shares(len(loss), seed=1)
    steps = DetectorConfig().dead_layer_steps
    zero[600 : 600 + steps - 1, 0] = 1.0  # one step short, then the layer recovers
    zero[800:, 2] = 0.98  # mostly, not entirely, dead
    assert detect_divergence(loss, zero_grad_fraction=zero) == []
