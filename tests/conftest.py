"""Test-wide TensorFlow set-up: quiet logs and two logical CPU devices (for MirroredStrategy tests).

Logical devices must be configured before TensorFlow initialises its runtime, so it happens here,
once, before any test module builds a tensor.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The image-check verdicts (data/decoding.py) go to a throw-away folder, not the user's ~/.cache.
os.environ["REID_KERAS_CACHE"] = tempfile.mkdtemp(prefix="reid_keras_test_cache_")
atexit.register(shutil.rmtree, os.environ["REID_KERAS_CACHE"], ignore_errors=True)

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
if _cpus:
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    except RuntimeError:  # runtime already initialised by an earlier import
        pass
