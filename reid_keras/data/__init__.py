"""Datasets on disk, synthetic pedestrians, samplers and tf.data pipelines."""
