"""The page: a run list on the left, three views (Live, Replay, Compare) on the right.

Component ids are the contract with ``callbacks.py`` and the browser tests.
"""

from __future__ import annotations

from clippy_monitor.dashboards.dash_app.summary import reaction_rows
from dash import dcc, html

from clippy_monitor.sensitivity import Sensitivity, summary_text

# No mode bar (it covers legends); drag zooms, double-click resets.
GRAPH_CONFIG = {"displaylogo": False, "displayModeBar": False}

VIEWS = (("live", "Live"), ("replay", "Replay"), ("compare", "Compare"))
PLAY_MS = 450  # one replay frame


def graph(id_: str, height: int) -> dcc.Graph:
    return dcc.Graph(
        id=id_,
        config=GRAPH_CONFIG,
        style={"height": f"{height}px"},
        figure={"data": [], "layout": {"height": height}},
    )


def build_layout(logdir: str, refresh_ms: int) -> html.Div:
    """The whole page.  ``refresh_ms``: how often the Live view polls the record."""
    return html.Div(
        className="cm-page",
        children=[
            _header(logdir),
            html.Div(className="cm-body", children=[_sidebar(refresh_ms), _main(refresh_ms)]),
        ],
    )


def _header(logdir: str) -> html.Header:
    return html.Header(
        className="cm-header",
        children=[
            html.Span("clippy-monitor", className="cm-brand"),
            html.Span("divergence monitor · Tang et al., KDD 2023", className="cm-sub"),
            html.Span(logdir, className="cm-logdir", title="served directory"),
        ],
    )


def _sidebar(refresh_ms: int) -> html.Aside:
    """The run list, refreshed at most every 2 s (twice the Live view's period)."""
    return html.Aside(
        className="cm-sidebar",
        children=[
            html.H3("Runs"),
            dcc.RadioItems(
                id="run-list",
                options=[],
                value=None,
                className="cm-runs",
                inputClassName="cm-run-input",
                labelClassName="cm-run-label",
            ),
            html.Div(id="runs-note", className="cm-note"),
            dcc.Interval(
                id="runs-interval",
                interval=max(2000, 2 * refresh_ms),
                n_intervals=0,
            ),
        ],
    )


def _main(refresh_ms: int) -> html.Main:
    """The view tabs and the three views (all in the page; callbacks show one)."""
    return html.Main(
        className="cm-main",
        children=[
            dcc.Tabs(
                id="view",
                value="live",
                className="cm-tabs",
                children=[
                    dcc.Tab(
                        label=label,
                        value=value,
                        className="cm-tab",
                        selected_className="cm-tab--selected",
                    )
                    for value, label in VIEWS
                ],
            ),
            _live(refresh_ms),
            _replay(),
            _compare(),
        ],
    )


def _live(refresh_ms: int) -> html.Div:
    return html.Div(
        id="live-view",
        className="cm-view",
        children=[
            html.Div(
                className="cm-statusbar",
                children=[
                    html.Div(id="live-badge", className="cm-badge cm-badge--waiting", children="…"),
                    html.Div(id="live-steps", className="cm-steps"),
                ],
            ),
            html.Div(id="live-alert", className="cm-alerts"),
            html.Div(
                className="cm-row",
                children=[
                    html.Div(
                        className="cm-col cm-col--wide",
                        children=[graph("live-loss", 340), graph("live-factors", 300)],
                    ),
                    html.Div(
                        className="cm-col cm-col--side",
                        children=[
                            html.H4("Lowest factor per rule"),
                            html.Div(id="live-factor-table"),
                            html.P(
                                "σ = 1: no clipping; the smaller σ, the harder the rule would clip. "
                                "'now' is the last recorded step.",
                                className="cm-note",
                            ),
                        ],
                    ),
                ],
            ),
            dcc.Interval(id="live-interval", interval=refresh_ms, n_intervals=0),
            dcc.Store(id="live-shown", data=None),
        ],
    )


def _replay() -> html.Div:
    return html.Div(
        id="replay-view",
        className="cm-view",
        style={"display": "none"},
        children=[
            html.Div(id="replay-alert", className="cm-alerts"),
            _replay_controls(),
            _replay_slider(),
            dcc.Interval(id="replay-interval", interval=PLAY_MS, disabled=True, n_intervals=0),
            html.Div(
                className="cm-row",
                children=[
                    html.Div(
                        className="cm-col cm-col--wide",
                        children=[
                            graph("replay-loss", 270),
                            _replay_sharpness(),
                            graph("replay-bars", 320),
                            graph("replay-factors", 320),
                            _replay_fig4(),
                        ],
                    ),
                    html.Div(
                        className="cm-col cm-col--side",
                        children=[
                            html.H4("Post-mortem"),
                            html.Div(id="replay-summary", className="cm-summary"),
                        ],
                    ),
                ],
            ),
        ],
    )


def _replay_controls() -> html.Div:
    """Episode picker, play/pause button and the current step's label."""
    return html.Div(
        className="cm-controls",
        children=[
            dcc.Dropdown(
                id="replay-episode",
                options=[],
                value=None,
                clearable=False,
                placeholder="No divergence to replay",
                className="cm-episode",
            ),
            html.Button("▶ Play", id="replay-play", n_clicks=0, className="cm-button"),
            html.Span(id="replay-step", className="cm-step-label"),
        ],
    )


def _replay_slider() -> html.Div:
    """The step slider over the episode's window (range and marks set by a callback)."""
    return html.Div(
        className="cm-slider",
        children=[
            dcc.Slider(
                id="replay-slider",
                min=0,
                max=1,
                step=1,
                value=0,
                marks={},
                updatemode="mouseup",
                tooltip={"placement": "bottom", "always_visible": False},
            )
        ],
    )


def _replay_sharpness() -> html.Div:
    """The sharpness plot and its reading; hidden (by a callback) for a run recorded without it."""
    return html.Div(
        id="replay-sharpness-panel",
        style={"display": "none"},
        children=[
            graph("replay-sharpness", 250),
            html.Div(id="replay-sharpness-note", className="cm-note"),
        ],
    )


def _replay_fig4() -> html.Div:
    """Figure 4b's panel: its title, the layer picker and the graph."""
    return html.Div(
        className="cm-fig4",
        children=[
            html.Div(
                className="cm-fig4-head",
                children=[
                    html.Span(
                        "Figure 4b: one layer at step-a, step-b and step-c",
                        className="cm-fig4-title",
                    ),
                    dcc.Dropdown(
                        id="replay-layer",
                        options=[],
                        value=None,
                        clearable=False,
                        className="cm-fig4-layer",
                    ),
                ],
            ),
            graph("replay-fig4", 330),
        ],
    )


def _compare() -> html.Div:
    return html.Div(
        id="compare-view",
        className="cm-view",
        style={"display": "none"},
        children=[
            html.Div(id="compare-alert", className="cm-alerts"),
            dcc.Dropdown(
                id="compare-runs",
                options=[],
                value=[],
                multi=True,
                placeholder="Pick runs to compare (up to 4)",
            ),
            html.Div(id="compare-table", className="cm-compare-table"),
            graph("compare-graph", 620),
            html.Div(id="compare-replays", className="cm-compare-replays"),
            dcc.Store(id="compare-shown", data=None),
        ],
    )


# ------------------------------------------------------------------- small renderers


BADGE_ICONS = {
    "healthy": "●",
    "micro": "▲",
    "diverged": "✖",
    "waiting": "…",
    "unknown": "?",
    "micro-done": "●",
    "error": "!",
}


def badge(state: str, title: str, detail: str, recovery: str | None = None) -> list:
    """The health badge; ``recovery``: the recovery ladder's one-line summary, if recorded."""
    parts = [
        html.Span(BADGE_ICONS.get(state, "●"), className="cm-badge-icon"),
        html.Span(title, className="cm-badge-title"),
        html.Span(detail, className="cm-badge-detail"),
    ]
    if recovery:
        parts.append(
            html.Span(
                f"↺ {recovery}",
                className="cm-badge-detail cm-badge-recovery",
                style={
                    "fontWeight": 600,
                    "borderLeft": "1px solid currentColor",
                    "paddingLeft": "10px",
                },
            )
        )
    return parts


def alert_list(items: list[dict]) -> list:
    return [
        html.Div(item["text"], className=f"cm-alert cm-alert--{item['level']}", role="alert")
        for item in items
    ]


def info_alert(message: str) -> list:
    return [html.Div(message, className="cm-alert cm-alert--info", role="status")]


def error_alert(message: str) -> list:
    return [html.Div(message, className="cm-alert cm-alert--danger cm-alert--error", role="alert")]


def run_option(entry: dict) -> dict:
    label = html.Span(
        className="cm-run",
        children=[
            html.Span(className=f"cm-dot cm-dot--{entry['state']}"),
            html.Span(entry["name"], className="cm-run-name"),
            html.Span(entry["detail"], className="cm-run-detail"),
        ],
    )
    return {"label": label, "value": entry["name"]}


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def layer_cell(name: str | None) -> html.Td:
    """A table cell holding a layer's name, which may wrap after each "/" when space is short."""
    if not name:
        return html.Td("—", className="cm-layer", title="")
    parts = name.split("/")
    children: list = [parts[0]]
    for part in parts[1:]:
        children += ["/", html.Wbr(), part]
    return html.Td(children, className="cm-layer", title=name)


def factor_table(rows: list[dict]) -> html.Table:
    head = html.Tr(
        [html.Th("rule"), html.Th("now"), html.Th("layer"), html.Th("lowest"), html.Th("at step")]
    )
    body = [
        html.Tr(
            [
                html.Td(r["label"], className=f"cm-rule cm-rule--{r['rule']}"),
                html.Td(
                    _fmt(r["now"]),
                    className="cm-num"
                    + (" cm-low" if r["now"] is not None and r["now"] < 1 else ""),
                ),
                layer_cell(r["now_layer"]),
                html.Td(_fmt(r["low"]), className="cm-num"),
                html.Td(
                    "—" if r["low_step"] is None else f"{r['low_step']:,}",
                    className="cm-num",
                    title=r["low_layer"] or "",
                ),
            ]
        )
        for r in rows
    ]
    return html.Table(
        [html.Thead(head), html.Tbody(body)], className="cm-table", id="live-factor-rows"
    )


def summary_panel(summary: dict, episode: dict) -> list:
    """The post-mortem beside the replay: verdict, key facts, factors at step-b, note."""
    out = [html.P(summary["verdict"], className="cm-verdict")]
    facts = _summary_facts(summary)
    if facts:
        out.append(html.Ul(facts, className="cm-facts"))
    reaction = summary.get("sensitivity")
    if reaction is not None:
        out.append(reaction_block(reaction))
    factors = summary.get("factors_at_step_b") or {}
    order = _factor_layers(summary, factors)
    if order:
        caption = (
            f"Factors at step-b ({episode['step_b']:,}) at the paper's thresholds, "
            "as you would train with them"
        )
        out.append(
            html.Div(
                [html.Div(caption, className="cm-caption"), _step_b_factor_table(factors, order)]
            )
        )
    if summary.get("note"):
        out.append(html.P(summary["note"], className="cm-note"))
    return out


def _summary_facts(summary: dict) -> list[html.Li]:
    """First task to move, culprits, the Clippy contrast and dead units, where known."""
    facts = []
    if summary.get("first_task"):
        facts.append(html.Li(["first task to move: ", html.B(summary["first_task"])]))
    if summary.get("culprits"):
        facts.append(
            html.Li(
                [
                    "culprits (earliest to leave their baseline): ",
                    html.B(", ".join(summary["culprits"][:5])),
                ]
            )
        )
    contrast = summary.get("contrast")
    if contrast:
        facts.append(
            html.Li(
                [
                    f"at step-b on {contrast['layer']}, at the paper's thresholds: σ Clippy ",
                    html.B(_fmt(contrast.get("clippy"))),
                    f" vs GC {_fmt(contrast.get('gc'))}, AGC {_fmt(contrast.get('agc'))}",
                ]
            )
        )
    dead = summary.get("dead_units")
    if (
        dead
        and dead.get("before")
        and dead.get("after")
        and dead["before"].get("mean") is not None
        and dead["after"].get("mean") is not None
    ):
        facts.append(
            html.Li(
                f"zero-gradient share: {dead['before']['mean']:.1%} before → {dead['after']['mean']:.1%} after"
            )
        )
    return facts


def _factor_layers(summary: dict, factors: dict) -> list[str]:
    """Up to 6 layers to tabulate: the culprits, else those Clippy clips hardest."""
    order = [c for c in summary.get("culprits", []) if c in factors][:6]
    if not order:
        order = sorted(
            (k for k, v in factors.items() if v.get("clippy") is not None),
            key=lambda k: factors[k]["clippy"],
        )[:6]
    return order


def reaction_block(reaction: Sensitivity) -> html.Div:
    """How each rule reacts at step-b, thresholds calibrated on the run's healthy steps (Figure 4b):
    the sentence, then one row per rule (its hardest-hit layer, jump and factor)."""
    caption = html.Div(
        "How each rule reacts at step-b, thresholds calibrated on this run's healthy steps",
        className="cm-caption",
    )
    rows = reaction_rows(reaction)
    if not rows:
        return html.Div([caption, html.P(summary_text(reaction), className="cm-note")])
    head = html.Tr([html.Th(h) for h in ("rule", "layer", "jump", "σ calibrated")])
    body = [
        html.Tr(
            [
                html.Td(html.B(r.rule) if r.reacts_most else r.rule, title=r.measurement),
                layer_cell(r.layer),
                html.Td(f"{_fmt(r.jump)}x ({r.measurement})", className="cm-num"),
                html.Td(_fmt(r.factor), className="cm-num"),
            ]
        )
        for r in rows
    ]
    return html.Div(
        [
            caption,
            html.P(summary_text(reaction), className="cm-note"),
            html.Table([html.Thead(head), html.Tbody(body)], className="cm-table"),
        ]
    )


def _step_b_factor_table(factors: dict, order: list[str]) -> html.Table:
    head = html.Tr(
        [
            html.Th("layer"),
            html.Th("σ GC"),
            html.Th("σ AGC"),
            html.Th("σ Clippy"),
            html.Th("Clippy/GC"),
        ]
    )
    rows = [
        html.Tr(
            [
                layer_cell(k),
                html.Td(_fmt(factors[k].get("gc")), className="cm-num"),
                html.Td(_fmt(factors[k].get("agc")), className="cm-num"),
                html.Td(_fmt(factors[k].get("clippy")), className="cm-num"),
                html.Td(_fmt(factors[k].get("clippy_over_gc")), className="cm-num"),
            ]
        )
        for k in order
    ]
    return html.Table([html.Thead(head), html.Tbody(rows)], className="cm-table")


def compare_rows(rows: list[dict]) -> html.Table:
    head = html.Tr(
        [
            html.Th(h)
            for h in (
                "run",
                "optimizer",
                "steps",
                "health",
                "micro",
                "full divergence",
                "last loss",
                "lowest σ applied",
            )
        ]
    )
    body = [
        html.Tr(
            [
                html.Td(r["run"]),
                html.Td(r["optimizer"]),
                html.Td(f"{r['steps']:,}", className="cm-num"),
                html.Td(html.Span(r["health"], className=f"cm-pill cm-pill--{r['state']}")),
                html.Td(str(r["micro"]), className="cm-num"),
                html.Td(r["full"]),
                html.Td(_fmt(r["last_loss"]), className="cm-num"),
                html.Td(_fmt(r["min_applied"]), className="cm-num"),
            ]
        )
        for r in rows
    ]
    return html.Table([html.Thead(head), html.Tbody(body)], className="cm-table cm-table--wide")


def replay_panels(panels: list[tuple[dict, list[str]]]) -> list:
    """Per run with replays: its loss overlaid with the replays' (a figure), then each verdict."""
    out: list = []
    for figure, verdicts in panels:
        out.append(dcc.Graph(figure=figure, config={"displaylogo": False}))
        out.append(html.Ul([html.Li(v) for v in verdicts], className="cm-replay-verdicts"))
    return out
