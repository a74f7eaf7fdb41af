"""reid_keras: person re-identification and person search in TensorFlow/Keras 3."""

__version__ = "0.1.0"
