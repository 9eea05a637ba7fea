"""What the Dash app shows, as plain data: the names of the modules that compute it, in one place.

Nothing here imports Dash or TensorFlow; figures are plain plotly dicts (cheap
to build, easy to assert on), so the tests call these functions directly.

* :mod:`.runs` -- :class:`Catalog`, the runs under the served directory and a
  live record (:class:`LiveRun`) per opened run.
* :mod:`.health` -- health badge, episodes, alerts, lowest factors, run list.
* :mod:`.recovery` -- what the recovery ladder did: alerts, rollback lines, skipped markers.
* :mod:`.style` -- colours and plotly layout helpers.
* :mod:`.figures` -- the Live and Compare views; :mod:`.replay` -- the Replay view.
* :mod:`.counterfactual` -- a run's counterfactual replays, for the Compare view.
* :mod:`.sharpness` -- the probed sharpness around a replayed episode.
* :mod:`.summary` -- the post-mortem beside the replay.
"""

from __future__ import annotations

from clippy_monitor.dashboards.dash_app.counterfactual import (  # noqa: F401
    ReplayComparison,
    replay_comparison,
    replay_figure,
    replay_originals,
)
from clippy_monitor.dashboards.dash_app.figures import (  # noqa: F401
    compare_figure,
    compare_table,
    live_factor_figure,
    live_loss_figure,
    live_summary,
)
from clippy_monitor.dashboards.dash_app.health import (  # noqa: F401
    WRITING_S,
    alerts,
    episode_label,
    episodes,
    health,
    lowest_factors,
    run_entry,
)
from clippy_monitor.dashboards.dash_app.recovery import (  # noqa: F401
    gave_up_alerts,
    reason_label,
    rollback_alerts,
    rollback_annotations,
    rollback_label,
    rollback_shapes,
    skipped_alerts,
    skipped_trace,
    step_note,
)
from clippy_monitor.dashboards.dash_app.replay import (  # noqa: F401
    ReplayWindow,
    bar_metrics,
    default_layer,
    figure4_figure,
    moment_shapes,
    replay_bars_figure,
    replay_factor_figure,
    replay_loss_figure,
    replay_sharpness_figure,
    replay_step_label,
    replay_window,
    short_layer_names,
)
from clippy_monitor.dashboards.dash_app.runs import MAX_OPEN_RUNS, READ_ERRORS, Catalog, LiveRun  # noqa: F401
from clippy_monitor.dashboards.dash_app.sharpness import (  # noqa: F401
    LIMIT_LABEL,
    SHARPNESS_HEIGHT,
    ProbedSharpness,
    probed_sharpness,
)
from clippy_monitor.dashboards.dash_app.style import (  # noqa: F401
    DEFAULT_MAX_POINTS,
    KIND_COLORS,
    KIND_LABELS,
    LOSS_COLOR,
    MAX_SHAPES,
    MEASUREMENTS,
    METRIC_COLORS,
    MOMENT_COLORS,
    MOMENT_LABELS,
    NEUTRAL_COLOR,
    RECOVERED_COLOR,
    RULE_COLORS,
    RULE_LABELS,
    RULES,
    SHOWN_RULES,
    TASK_COLORS,
    empty_figure,
    event_shapes,
)
from clippy_monitor.dashboards.dash_app.summary import postmortem_summary  # noqa: F401

from clippy_monitor.record import RecordError, RunRefused  # noqa: F401
from clippy_monitor.record.format import METRIC_LABELS  # noqa: F401
from clippy_monitor.record.status import decode_status  # noqa: F401
from clippy_monitor.replay_reading import replay_paths  # noqa: F401
