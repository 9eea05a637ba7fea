"""The one catalog of metrics and rules (clippy_monitor.catalog), and the readers drawing from it.

The last test is the recipe of docs/ARCHITECTURE.md: a per-layer metric added as one
catalog row (here a throwaway ``weight_linf``, max |w|, added at run time) is shown by
the post-mortem, the Dash replay and the TensorBoard tab with no other edit.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clippy_monitor.dashboards.dash_app import data as D

from clippy_monitor import catalog
from clippy_monitor.postmortem import analysis, html
from clippy_monitor.postmortem.report import build_report
from clippy_monitor.record import RunWriter, format, load_run
from clippy_monitor.tensorboard_plugin import data as TB
from clippy_monitor.tensorboard_plugin import metadata
from clippy_monitor.tensorboard_plugin.demo import DemoRun

STEP_B = 200


def test_catalog_imports_nothing_heavy():
    code = "import sys, clippy_monitor.catalog; print(sorted({'numpy', 'tensorflow'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_name_derives_from_the_rows():
    assert format.LAYER_METRICS == tuple(m.name for m in catalog.METRICS)
    assert (
        format.METRIC_LABELS == metadata.METRIC_LABELS == {m.name: m.label for m in catalog.METRICS}
    )
    assert metadata.HEATMAP_REDUCE == {m.name: m.reduce for m in catalog.METRICS}
    assert format.FACTOR_METRICS == {
        "gc": "gc_factor",
        "agc": "agc_factor",
        "clippy": "clippy_factor",
        "applied": "applied_factor",
    }
    assert analysis.RULES == D.RULES == catalog.RULE_NAMES == ("gc", "agc", "clippy", "applied")
    assert (
        analysis.MEASUREMENTS
        == D.MEASUREMENTS
        == ("grad_norm", "grad_weight_ratio", "update_weight_linf")
    )
    assert D.SHOWN_RULES == ("gc", "agc", "clippy")
    assert D.MOMENT_COLORS == catalog.MOMENT_COLORS and D.RULE_COLORS == catalog.RULE_COLORS


def test_rows_are_consistent():
    for m in catalog.METRICS:
        assert m.kind in catalog.KINDS and m.reduce in ("max", "min"), m
        assert (m.kind == "factor") == (m.rule is not None), m
    for r in catalog.RULES:
        factor = catalog.metric(r.factor)
        assert factor.kind == "factor" and factor.rule == r.name
        assert r.measurement is None or catalog.metric(r.measurement).kind == "measurement"
        assert catalog.rule_of(r.factor) is r
    assert (
        catalog.label("no_such_metric") == "no_such_metric"
        and catalog.reduce_of("no_such_metric") == "max"
    )
    with pytest.raises(KeyError):
        catalog.metric("no_such_metric")
    as_json = json.loads(json.dumps(catalog.to_json()))
    assert [m["name"] for m in as_json["metrics"]] == list(catalog.LAYER_METRICS)
    assert {m["name"] for m in as_json["moments"]} == {"step_a", "step_b", "step_c", "recovered"}


# ------------------------------------------------------------- a metric added as one row

WEIGHT_LINF = catalog.Metric(
    "weight_linf", "‖w‖∞", "norm", "max", description="largest |w| (throwaway)"
)


def _write_with_extra_metric(path: Path) -> None:
    """A record (from the demo) whose layer metrics end with ``weight_linf``."""
    demo = DemoRun(n_steps=400, n_layers=4, micro=[], full=STEP_B, seed=3)
    meta = demo.meta() | {"layer_metrics": [*demo.meta()["layer_metrics"], WEIGHT_LINF.name]}
    steps, stats, series = demo.chunk(1, 400)
    extra = np.full((len(steps), 1, 4), 0.25, np.float32)
    with RunWriter(path, meta, tensorboard=False) as writer:
        writer.append(steps, np.concatenate([stats, extra], axis=1), series, None)
        writer.add_events(demo.events())


def test_a_metric_added_as_one_catalog_row_is_shown_by_every_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "METRICS", (*catalog.METRICS, WEIGHT_LINF))
    _write_with_extra_metric(tmp_path / "run")
    name = WEIGHT_LINF.name

    # Post-mortem: a JSON table column at step-a/b/c and a heatmap in the HTML page.
    run = load_run(tmp_path / "run")
    report = build_report(run)
    assert report["table"][run.layers[0]]["step_b"][name] == 0.25
    assert name in [m.name for m in html.heatmap_metrics()]
    assert f'"whole_{name}"' in html.render_html(run, report)

    # Dash replay: one bar per layer, labelled from the catalog.
    catalog_ = D.Catalog(tmp_path)
    with catalog_.open("run") as live:
        episode = next(e for e in D.episodes(live) if e["kind"] == "full")
        window = D.replay_window(live, episode)
        bars = D.replay_bars_figure(window, STEP_B)
    assert name in [m.name for m in D.bar_metrics()]
    assert WEIGHT_LINF.label in [trace["name"] for trace in bars["data"]]

    # TensorBoard: offered as a heatmap, with its label and reduction.
    view = TB.Catalog(str(tmp_path)).view("run")
    summary = TB.summary_payload("run", view)
    assert name in summary["catalog"]["extra_heatmaps"] and name in summary["layer_metrics"]
    assert summary["metric_labels"][name] == WEIGHT_LINF.label
    heatmap = TB.heatmap_payload("run", view, name, None, None, 50)
    assert heatmap["label"] == WEIGHT_LINF.label and heatmap["reduce"] == "max"


def test_frozen_rows():
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalog.METRICS[0].label = "x"  # type: ignore[misc]


def test_a_rule_is_one_row_its_factor_metric_is_made_from_it():
    """Issue 14: adding a clipping rule is its factor in clipping.py and one Rule row."""
    factors = [m for m in catalog.METRICS if m.kind == "factor"]
    assert factors == [r.factor_metric() for r in catalog.RULES]
    lamb = catalog.Rule("lamb", "LAMB", None, "#000000", "footnote 5", False, "LAMB's trust ratio")
    row = lamb.factor_metric()
    assert (row.name, row.label, row.kind, row.reduce, row.rule) == (
        "lamb_factor",
        "σ LAMB",
        "factor",
        "min",
        "lamb",
    )
    assert catalog.to_json()["rules"][2]["factor"] == "clippy_factor"
