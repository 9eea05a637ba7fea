"""Shared test setup: quiet TF, two logical CPUs for MirroredStrategy, seeded tests."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices so tf.distribute.MirroredStrategy can run two replicas.
# Must happen before TF initialises its devices; a no-op if something already did.
try:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )
except RuntimeError:
    pass


@pytest.fixture(autouse=True)
def _seed() -> None:
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def mirrored_strategy() -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy over the two logical CPUs, shared by the whole session.

    A second MirroredStrategy in the same process reuses collective instance keys
    and aborts with "Shape mismatch in the collective instance" (TF 2.21, also with
    keras.optimizers.Adagrad), so tests must not create their own.
    """
    devices = tf.config.list_logical_devices("CPU")
    if (
        len(devices) < 2
    ):  # the set-up at the top of this file failed: a broken test run, not a missing dependency
        pytest.fail("needs two logical CPU devices (set up at the top of conftest.py)")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
