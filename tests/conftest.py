import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATASETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def cars196_root():
    root = os.path.abspath(os.path.join(SHARED_DATASETS, "cars196_half"))
    if not os.path.exists(os.path.join(root, "labels.csv")):
        pytest.skip(f"real data set not present at {root}")
    return root


def _split_cpu_into_two_logical_devices():
    """MirroredStrategy tests need two devices; this machine has one CPU and no GPU."""
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:  # TensorFlow was initialised before conftest: keep one device
        pass


_split_cpu_into_two_logical_devices()


@pytest.fixture(scope="session")
def two_cpu_devices():
    import tensorflow as tf

    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("TensorFlow was initialised before the CPU could be split into 2 devices")
    return [d.name for d in devices[:2]]


@pytest.fixture(scope="session")
def mirrored_strategy(two_cpu_devices):
    """One MirroredStrategy over the two logical CPUs, shared by every test.

    Two strategies over the same devices in one process reuse collective instance keys,
    and the second one's all-reduce then aborts ("Collective instance … expected type …").
    """
    from fgkeras import experiments

    strategy = experiments.distribution_strategy("mirrored")  # the one `train.distribute=mirrored` uses
    assert strategy.num_replicas_in_sync == len(two_cpu_devices)
    return strategy
