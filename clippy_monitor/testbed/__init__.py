"""The paper's testbed: multitask ranking models, day-partitioned logs, sequential
training, the experiments of section 5 / appendix A, and the demo."""

from clippy_monitor.testbed.data import KuaiRandLog, SyntheticConfig, SyntheticLog
from clippy_monitor.testbed.models import (
    LARGE,
    LARGE_DCN,
    MODELS,
    SMALL,
    FeatureSpec,
    ModelConfig,
    Task,
    build_model,
    compile_model,
)

__all__ = [
    "LARGE",
    "LARGE_DCN",
    "MODELS",
    "SMALL",
    "FeatureSpec",
    "KuaiRandLog",
    "ModelConfig",
    "SyntheticConfig",
    "SyntheticLog",
    "Task",
    "build_model",
    "compile_model",
]
