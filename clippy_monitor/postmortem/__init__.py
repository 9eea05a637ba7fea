"""Post-mortem of a run record: when it diverged, where, which task, and whether Clippy would have caught it.

Tang et al., KDD 2023, sections 2.1 and 4.1, Figure 4 and appendix B.  Use
``clippy-monitor postmortem RUN [--json] [--html FILE]`` or::

    from clippy_monitor.postmortem import postmortem
    report = postmortem("logs/run")        # the JSON object of docs/POSTMORTEM.md
    print(report["verdict"])

Importing this package does not import TensorFlow (only re-detection does).
"""

from clippy_monitor.postmortem.analysis import Options
from clippy_monitor.postmortem.report import (
    SCHEMA_VERSION,
    build_report,
    postmortem,
    render_text,
    to_json,
)

__all__ = ["SCHEMA_VERSION", "Options", "build_report", "postmortem", "render_text", "to_json"]
