"""Front ends: the Dash app, installed as ``clippy_monitor.dashboards`` (the TensorBoard tab is
``clippy_monitor.tensorboard_plugin``)."""
