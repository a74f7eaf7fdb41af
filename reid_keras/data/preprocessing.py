"""Backbone input normalisation by name: the one place that knows the names and the math.

Images arrive as RGB float pixels 0..255 (after decoding and resizing). The modes are those of
`keras.applications.imagenet_utils.preprocess_input`, written out so they run unchanged eagerly
(numpy in, tensor out), inside `tf.function` (the SavedModel export) and inside `tf.data`:

- "raw": unchanged. Keras' EfficientNets rescale and normalise inside the model (DESIGN.md).
- "unit": x / 255.
- "caffe": RGB -> BGR, minus the ImageNet channel means (ResNet50, VGG16 and relatives).
- "tf": x / 127.5 - 1 (MobileNet / Inception style).
- "torch": x / 255, minus the ImageNet means, divided by the standard deviations (DenseNet style).
"""
from __future__ import annotations

import dataclasses

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)

# Accepted names -> mode. Names are matched case-insensitively with "_" and "-" ignored, and any
# "efficientnet..." (e.g. "EfficientNetB3") means "efficientnet".
PREPROCESSING_MODES = {
    "efficientnet": "raw", "none": "raw", "raw": "raw",
    "unit": "unit",
    "caffe": "caffe", "resnet50": "caffe", "resnet101": "caffe", "resnet152": "caffe",
    "vgg16": "caffe", "vgg19": "caffe",
    "tf": "tf",
    "torch": "torch",
}

# Bounds of each mode's output for inputs in [0, 255] (augmentation must stay inside them).
VALUE_RANGES = {
    "raw": (0.0, 255.0),
    "unit": (0.0, 1.0),
    "caffe": (-max(CAFFE_MEAN_BGR), 255.0 - min(CAFFE_MEAN_BGR)),
    "tf": (-1.0, 1.0),
    "torch": (min(-m / s for m, s in zip(TORCH_MEAN_RGB, TORCH_STD_RGB)),
              max((1.0 - m) / s for m, s in zip(TORCH_MEAN_RGB, TORCH_STD_RGB))),
}


def check_preprocessing(name: str) -> str:
    """The canonical name (a key of PREPROCESSING_MODES) for `name`.

    Raises:
        ValueError: `name` is not a known preprocessing; the message lists the accepted names.
    """
    key = str(name).lower().replace("_", "").replace("-", "")
    if key.startswith("efficientnet"):
        key = "efficientnet"
    if key not in PREPROCESSING_MODES:
        raise ValueError(f"unknown preprocessing {name!r}: expected one of {', '.join(PREPROCESSING_MODES)} "
                         "(case-insensitive; any 'efficientnet...' name means 'efficientnet')")
    return key


def preprocessing_mode(name: str) -> str:
    """The mode ("raw", "unit", "caffe", "tf" or "torch") of preprocessing `name`."""
    return PREPROCESSING_MODES[check_preprocessing(name)]


def preprocess(images, name: str):
    """Normalise `images` (`[..., 3]` RGB, pixel values 0..255) for the backbone `name`.

    Integer input is cast to float32; float input keeps its dtype. Returns a tensor (numbers equal
    to `keras.applications.imagenet_utils.preprocess_input(images, mode=...)`).
    """
    import tensorflow as tf  # tf ops (not keras.ops): this runs in tf.data graphs; imported lazily for CLIs

    mode = preprocessing_mode(name)
    x = tf.convert_to_tensor(images)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    if mode == "unit":
        return x / 255.0
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "caffe":
        return tf.reverse(x, axis=[-1]) - tf.constant(CAFFE_MEAN_BGR, x.dtype)
    if mode == "torch":
        return (x / 255.0 - tf.constant(TORCH_MEAN_RGB, x.dtype)) / tf.constant(TORCH_STD_RGB, x.dtype)
    return x


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """A resolved preprocessing: canonical `name`, its `mode`, and the `value_range` of its output."""

    name: str
    mode: str
    value_range: tuple

    def __call__(self, images):
        return preprocess(images, self.name)


def preprocessing_for(backbone_name: str) -> Preprocessing:
    """The input normalisation a backbone expects, e.g. "EfficientNetB3", "resnet50", "unit", "none"."""
    name = check_preprocessing(backbone_name)
    mode = PREPROCESSING_MODES[name]
    return Preprocessing(name, mode, VALUE_RANGES[mode])
