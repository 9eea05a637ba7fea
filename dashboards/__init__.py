"""Front ends: the Dash app and the TensorBoard plugin, installed as ``clippy_monitor.dashboards``."""
