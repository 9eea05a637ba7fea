"""Counterfactual replay (issue 16, section 2): keep the snapshot before a full divergence
and the batches' fingerprints, train the divergence again with another optimizer, and
compare in the post-mortem.

The original: a tiny regression model under plain Adagrad whose learning rate jumps from
0.05 to 1000 at step 40 (a schedule), so the loss explodes there and the detector (short
warm-up and recovery window) records a full divergence.  Replays restart from the kept
snapshot with a low constant learning rate, or with ClippyAdagrad on the same schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import clippy_monitor
from clippy_monitor import ClippyAdagrad, DetectorConfig, DivergenceMonitor
from clippy_monitor.counterfactual import kept_snapshot, replay, restore
from clippy_monitor.monitor.recovery import RecoveryConfig
from clippy_monitor.monitor.replay_keeper import batch_fingerprint, same_fingerprint
from clippy_monitor.postmortem import postmortem, render_text
from clippy_monitor.postmortem.html import render_html
from clippy_monitor.record import load_run
from clippy_monitor.record.format import META_FILE, RECORD_FILES
from clippy_monitor.replay_reading import FINGERPRINT, REPLAY_DIR, read_replays
from tests.browser import chromium, screenshot_path

BATCH, STEPS, JUMP = 16, 80, 40
MARGIN = 10


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, 4)).astype("float32")
    return x, x.sum(1, keepdims=True)


def _batch(k: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _data()
    return x[k * BATCH : (k + 1) * BATCH], y[k * BATCH : (k + 1) * BATCH]


def _model() -> keras.Model:
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )


def _jump() -> keras.optimizers.schedules.LearningRateSchedule:
    return keras.optimizers.schedules.PiecewiseConstantDecay([JUMP], [0.05, 1000.0])


@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("replay") / "run"
    keras.utils.set_random_seed(0)
    model = _model()
    model.compile(optimizer=keras.optimizers.Adagrad(_jump()), loss="mse")
    monitor = DivergenceMonitor(
        logdir,
        tensorboard=False,
        flush_every=20,
        detector=DetectorConfig(warmup_steps=20, recovery_window=20),
        keep_replay=True,
        replay_snapshot_every=10,
    )
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[monitor])
    monitor.close()
    return logdir


def _batches_from(start: int):
    return (_batch(k) for k in range(start, STEPS))


@pytest.fixture(scope="module")
def replays(diverged) -> dict[str, Path]:
    start = clippy_monitor.replay_start(diverged)
    low = replay(
        diverged,
        _model,
        _batches_from(start),
        keras.optimizers.Adagrad(0.05),
        name="low-lr",
        margin=MARGIN,
        compile_kwargs={"loss": "mse"},
    )
    clippy = replay(
        diverged,
        _model,
        _batches_from(start),
        ClippyAdagrad(_jump()),
        name="clippy",
        margin=MARGIN,
        compile_kwargs=lambda model, optimizer: model.compile(optimizer=optimizer, loss="mse"),
    )
    return {"low-lr": low, "clippy": clippy}


def test_the_run_keeps_one_snapshot_before_step_a(diverged):
    run = load_run(diverged)
    full = [e for e in run.events if e["kind"] == "full"]
    assert len(full) == 1 and full[0]["step_a"] == JUMP + 1
    kept = kept_snapshot(diverged)
    # Snapshots after steps 9, 19, 29, 39, ...: the newest at or before step-a is 39.
    assert kept.snapshot_step == 39 and kept.step_c == full[0]["step_c"]
    assert sorted(p.name for p in (diverged / REPLAY_DIR).iterdir()) == [
        "replay.json",
        "snapshot-000000000039.npz",
    ]
    assert not set(RECORD_FILES) & {p.name for p in (diverged / REPLAY_DIR).iterdir()}
    assert kept.optimizer_variables[0].endswith("iteration")
    assert len(kept.shapes) == len(kept.model_variables) + len(kept.optimizer_variables)


def test_the_fingerprints_recorded_in_the_step_match_the_batches(diverged):
    run = load_run(diverged)
    assert run.meta["replay_snapshot_every"] == 10
    recorded = run.series(FINGERPRINT)
    assert np.all(np.isfinite(recorded)) and len(recorded) == STEPS
    for k in (0, 39, 41, 79):
        assert same_fingerprint(float(batch_fingerprint(_batch(k))), recorded[k])
    # Another batch, or the same rows in another order, has another fingerprint.
    assert not same_fingerprint(recorded[3], recorded[4])
    x, y = _batch(3)
    assert not same_fingerprint(float(batch_fingerprint((x[::-1], y[::-1]))), recorded[3])


def test_fingerprint_of_non_finite_values_is_finite_and_distinct():
    x = np.ones((4, 3), np.float32)
    nan = x.copy()
    nan[1, 2] = np.nan
    inf = x.copy()
    inf[1, 2] = np.inf
    values = [float(batch_fingerprint((v,))) for v in (x, nan, inf)]
    assert all(np.isfinite(values)) and len({round(v, 5) for v in values}) == 3


def test_a_monitor_without_keep_replay_keeps_nothing(tmp_path):
    model = _model()
    model.compile(optimizer=keras.optimizers.Adagrad(0.05), loss="mse")
    x, y = _batch(0)
    model.fit(x, y, verbose=0, callbacks=[DivergenceMonitor(tmp_path, tensorboard=False)])
    assert FINGERPRINT not in load_run(tmp_path).series_names
    assert not (tmp_path / REPLAY_DIR).exists()
    with pytest.raises(ValueError, match="keep_replay=True"):
        kept_snapshot(tmp_path)


def test_under_the_recovery_ladder_the_snapshot_before_step_a_is_kept(tmp_path):
    keras.utils.set_random_seed(0)
    model = _model()
    model.compile(optimizer=keras.optimizers.Adagrad(0.1), loss="mse")
    x, y = _data()
    x[30 * BATCH] = np.nan  # step 30 fully diverges (non_finite); the ladder rolls back
    monitor = DivergenceMonitor(
        tmp_path,
        tensorboard=False,
        on_divergence="recover",
        skip_bad_steps=False,
        recovery=RecoveryConfig(snapshot_every=5, check_every=5, cooldown_steps=10),
        keep_replay=True,
        replay_snapshot_every=7,
    )
    model.fit(x[: 60 * BATCH], y[: 60 * BATCH], batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[monitor])  # fmt: skip
    monitor.close()
    kinds = [e["kind"] for e in load_run(tmp_path).events]
    assert kinds[:2] == ["full", "rollback"]
    kept = kept_snapshot(tmp_path)
    assert (kept.step_a, kept.snapshot_step) == (29, 27)  # snapshots after 6, 13, 20, 27, 34
    assert len(list((tmp_path / REPLAY_DIR).glob("*.npz"))) == 1


def test_restore_sets_the_snapshot_exactly(diverged):
    kept = kept_snapshot(diverged)
    with np.load(diverged / REPLAY_DIR / kept.file) as data:
        values = [data[f"v{i}"] for i in range(len(data.files))]
    model = _model()  # another instance: its layers are named differently
    model.compile(optimizer=keras.optimizers.Adagrad(0.01), loss="mse")
    restored, missing = restore(model, kept, values)
    n = len(kept.model_variables)
    for variable, value in zip(model.variables, values[:n]):
        assert np.array_equal(variable.numpy(), value)
    assert missing == [] and len(restored) == 1 + 4  # iterations and four accumulators
    assert int(model.optimizer.iterations.numpy()) == 40
    slots = [v for v in model.optimizer.variables if "accumulator" in v.path]
    saved = [value for p, value in zip(kept.optimizer_variables, values[n:]) if "accum" in p]
    assert len(slots) == len(saved) == 4
    for variable, value in zip(slots, saved):
        assert np.array_equal(variable.numpy(), value)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)


def test_replays_do_not_diverge_and_line_up_with_the_original(diverged, replays):
    original = load_run(diverged)
    kept = kept_snapshot(diverged)
    for path in replays.values():
        run = load_run(path)
        assert path.parent == diverged and (path / META_FILE).exists()
        assert run.steps[0] == 40 and run.steps[-1] == kept.decision_step + MARGIN
        assert not [e for e in run.events if e["kind"] == "full"]
        # Step 40's loss is computed at the restored weights on the same batch.
        assert run.series("loss")[0] == pytest.approx(original.series("loss")[40], rel=1e-6)
        at_c = run.series("loss")[kept.step_c - 40]
        assert at_c < 1.0 < original.series("loss")[kept.step_c]
    info = json.loads((replays["clippy"] / "clippy_replay.json").read_text())
    assert any("accumulator" in p for p in info["restored"])
    assert all("clipping_factor" in p or "non_finite" in p for p in info["not_restored"])


def test_a_wrong_batch_raises_naming_its_step(diverged):
    start = clippy_monitor.replay_start(diverged)
    batches = [_batch(k) for k in range(start, STEPS)]
    batches[3] = _batch(0)
    with pytest.raises(ValueError, match=f"for step {start + 3} "):
        replay(
            diverged, _model, batches, keras.optimizers.Adagrad(0.05), name="wrong",
            compile_kwargs={"loss": "mse"},
        )  # fmt: skip
    assert not (diverged / "replay-wrong" / META_FILE).exists()


def test_the_postmortem_lists_the_replays(diverged, replays):
    outcomes = {o.name: o for o in read_replays(load_run(diverged))}
    assert set(outcomes) == {"low-lr", "clippy"}
    assert outcomes["clippy"].optimizer == "ClippyAdagrad" and not outcomes["clippy"].diverged
    report = postmortem(diverged)
    rows = {r["name"]: r for r in report["replays"]}
    assert rows["low-lr"]["diverged"] is False and rows["low-lr"]["restored_all"] is True
    assert rows["low-lr"]["loss_at_c"][0] > 1.0 > rows["low-lr"]["loss_at_c"][1]
    json.dumps(report, allow_nan=False)
    text = render_text(report)
    assert "replays" in text and "replay clippy (ClippyAdagrad, steps 40-" in text
    assert "did not diverge through step" in text
    page = render_html(load_run(diverged), report)
    assert "<h2>Replays" in page and "replay low-lr (Adagrad" in page


def test_replays_section_in_the_browser(diverged, replays, tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "report.html"
    path.write_text(render_html(load_run(diverged), postmortem(diverged)), encoding="utf-8")
    for browser in chromium(window_size="1300,1200", offline=True):
        browser.get(path.as_uri())
        cells = browser.find_elements(By.CSS_SELECTOR, "table.replays tbody tr td:first-child")
        assert sorted(c.text for c in cells) == ["clippy", "low-lr"]
        section = browser.find_element(By.CSS_SELECTOR, "div.replays")
        browser.execute_script("arguments[0].scrollIntoView(); window.scrollBy(0, -80)", section)
        shot = screenshot_path("postmortem_replays.png", tmp_path)
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
