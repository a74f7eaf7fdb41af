"""CaffeNet (BVLC reference CaffeNet, ref. [26] of identification_verification_embedding.txt) in Keras.

The paper's CaffeNet backbone (Fig. 3, §III, §IV-A "Input preparation"): 227×227 input, the final
1,000-way FC (fc8) removed, the 4,096-d fc7 activation is the embedding f. Layers (Caffe's names):

    conv1 96×11×11/4 ─ relu1 ─ pool1 3/2 ─ norm1 ─ conv2 256×5×5 pad 2 group 2 ─ relu2 ─ pool2 ─ norm2
    ─ conv3 384×3×3 pad 1 ─ conv4 384×3×3 pad 1 group 2 ─ conv5 256×3×3 pad 1 group 2 ─ pool5
    ─ fc6 ─ relu6 ─ drop6 (0.5) ─ fc7 ─ relu7            (every conv is followed by its ReLU)

CaffeNet pools before the LRN (AlexNet normalises first). fc6 and fc7 are convolutions (6×6 valid
and 1×1), so the net is fully convolutional: at 227×227 it ends in a 1×1×4096 map, which the
embedding's global pooling turns into exactly the fc7 vector; larger inputs give a larger map.

Output sizes follow Caffe: convolutions round down, pooling rounds UP,
`ceil((s - 3) / 2) + 1`. Keras pools round down, so `<pool>_ceil` pads one zero row / column at
the bottom / right when `s - 3` is odd. Every pool input is a ReLU (or LRN of a ReLU) output, so it
is >= 0 and a zero pad never wins the max: the result equals Caffe's clipped last window. At 227
all of 55, 27 and 13 are odd and nothing is padded: 227 → conv1 55 → pool1 27 → pool2 13 →
pool5 6. Conv pads are Caffe's symmetric pads (explicit ZeroPadding2D). With ceil pooling the
smallest input giving pool5 >= 6 (what fc6 needs) is 199, not 227 (`MIN_INPUT_SIDE`).

Input: Caffe trained CaffeNet on BGR pixels 0..255 minus the ImageNet mean. Our "caffe"
preprocessing (`reid_keras.data.preprocessing.preprocess`: `tf.reverse` of the RGB channels, then
minus CAFFE_MEAN_BGR (103.939, 116.779, 123.68)) feeds exactly that, the same as for VGG16 /
ResNet50, so conv1's BGR-ordered Caffe kernels are used without a channel flip.

Weights: `models/caffe_weights.py` reads Caffe's `.caffemodel`; `python -m reid_keras.models.caffenet
convert bvlc_reference_caffenet.caffemodel` writes `<Keras cache>/caffenet_imagenet.weights.h5`, the
file `backbones.build_backbone("caffenet", weights="imagenet")` loads.
"""
from __future__ import annotations

import sys
from typing import Dict, Sequence

import keras

# (name, filters, kernel, stride, pad, groups): BVLC reference CaffeNet's deploy.prototxt.
CONV_LAYERS = (("conv1", 96, 11, 4, 0, 1), ("conv2", 256, 5, 1, 2, 2), ("conv3", 384, 3, 1, 1, 1),
               ("conv4", 384, 3, 1, 1, 2), ("conv5", 256, 3, 1, 1, 2))
FC_LAYERS = (("fc6", 4096), ("fc7", 4096))
WEIGHT_LAYERS = tuple(spec[0] for spec in CONV_LAYERS + FC_LAYERS)
POOL_AFTER = {"conv1": "pool1", "conv2": "pool2", "conv5": "pool5"}
NORM_AFTER = {"pool1": "norm1", "pool2": "norm2"}
FC6_KERNEL = 6  # pool5 is 6×6 at 227×227; fc6 is the InnerProduct over those 256×6×6 values
WEIGHTS_FILE = "caffenet_imagenet.weights.h5"  # in backbones.keras_cache_dir()
DROPOUT = 0.5  # drop6 of the reference model


def _pool_out(side: int) -> int:
    return -(-(side - 3) // 2) + 1 if side >= 3 else 0  # Caffe: ceil((s - kernel) / stride) + 1


def feature_sizes(side: int) -> Dict[str, int]:
    """Caffe's spatial size after each stage for an input side `side` (227 → conv1 55, pool1 27,
    pool2 13, pool5 6, fc7 1). Non-positive values mean the input is too small."""
    sizes, s = {}, int(side)
    for name, _, kernel, stride, pad, _ in CONV_LAYERS:
        s = (s + 2 * pad - kernel) // stride + 1 if s + 2 * pad >= kernel else 0
        sizes[name] = s
        if name in POOL_AFTER:
            s = _pool_out(s)
            sizes[POOL_AFTER[name]] = s
    sizes["fc7"] = s - FC6_KERNEL + 1
    return sizes


MIN_INPUT_SIDE = next(side for side in range(11, 1000) if feature_sizes(side)["fc7"] >= 1)  # 199


def too_small_message(image_size) -> str:
    """The error for an input CaffeNet cannot take (`backbones.check_image_size` raises it too)."""
    return (f"bad image_size {image_size!r} for CaffeNet: expected (height, width), two integers >= {MIN_INPUT_SIDE} "
            f"(fc6 is a 6×6 valid convolution over pool5, which needs >= {MIN_INPUT_SIDE} pixels), e.g. (227, 227) "
            "as in the paper")


@keras.saving.register_keras_serializable(package="reid_keras")
class CaffeLRN(keras.layers.Layer):
    """Caffe's ACROSS_CHANNELS local response normalisation on a channels-last map:
    `b_c = a_c / (k + alpha / n * sum_{|c' - c| <= (n - 1) / 2} a_c'^2) ** beta` (zeros beyond the edges).

    Args:
        local_size: n, the (odd) number of channels summed.
        alpha, beta, k: Caffe's `lrn_param` (CaffeNet: 1e-4, 0.75, 1).
    """

    def __init__(self, local_size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(local_size, bool) or int(local_size) != local_size or local_size < 1 or local_size % 2 == 0:
            raise ValueError(f"CaffeLRN local_size must be a positive odd integer, got {local_size!r}")
        self.local_size, self.alpha, self.beta, self.k = int(local_size), float(alpha), float(beta), float(k)

    def call(self, inputs):
        # Keras has no LRN op; TF's fused kernel (with its gradient) computes
        # a / (bias + alpha' * sum_{|c'-c| <= depth_radius} a^2) ** beta. Caffe divides alpha by the
        # window size n, TF does not: alpha' = alpha / n, depth_radius = (n - 1) / 2.
        import tensorflow as tf

        return tf.nn.local_response_normalization(inputs, depth_radius=(self.local_size - 1) // 2, bias=self.k,
                                                  alpha=self.alpha / self.local_size, beta=self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "local_size": self.local_size, "alpha": self.alpha, "beta": self.beta,
                "k": self.k}


@keras.saving.register_keras_serializable(package="reid_keras")
class GroupedConv2D(keras.layers.Layer):
    """Caffe's grouped convolution (`group: 2` of conv2/4/5): group g convolves the g-th slice of
    the input channels with the g-th slice of the filters; "valid" padding, bias, no activation.

    Same weights as `keras.layers.Conv2D(groups=...)`, kernel (kh, kw, in/groups, out) then bias, so
    Caffe's blobs load the same way. It runs one ordinary convolution per group because Keras' TF
    backend sends grouped convolutions through an XLA-compiled function on CPU: forward + backward
    of conv2 at batch 32 took 1.43 s that way against 0.13 s split per group (this machine).
    """

    def __init__(self, filters: int, kernel_size: int, groups: int, strides: int = 1, **kwargs):
        super().__init__(**kwargs)
        if filters % groups:
            raise ValueError(f"GroupedConv2D filters {filters} must be a multiple of groups {groups}")
        self.filters, self.kernel_size, self.groups, self.strides = int(filters), int(kernel_size), int(groups), \
            int(strides)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        if channels % self.groups:
            raise ValueError(f"{self.name}: {channels} input channels are not a multiple of groups {self.groups}")
        self.kernel = self.add_weight(name="kernel", initializer="glorot_uniform",
                                      shape=(self.kernel_size, self.kernel_size, channels // self.groups, self.filters))
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, inputs):
        ops = keras.ops
        slices = zip(ops.split(inputs, self.groups, axis=-1), ops.split(self.kernel, self.groups, axis=-1))
        outputs = [ops.conv(x, kernel, strides=self.strides, padding="valid") for x, kernel in slices]
        return ops.concatenate(outputs, axis=-1) + self.bias

    def compute_output_shape(self, input_shape):
        side = [None if s is None else (int(s) - self.kernel_size) // self.strides + 1 for s in input_shape[1:3]]
        return (input_shape[0], *side, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "groups": self.groups, "strides": self.strides}


def _caffe_pool(x, name: str):
    height, width = int(x.shape[1]), int(x.shape[2])
    # Always present (possibly padding nothing) so the layer list does not depend on the input size.
    x = keras.layers.ZeroPadding2D(((0, (height - 3) % 2), (0, (width - 3) % 2)), name=f"{name}_ceil")(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="valid", name=name)(x)


def _filters(count: int, width: float) -> int:
    return max(2, 2 * int(round(count * width / 2)))  # even, so that groups=2 divides it


def build_caffenet(image_size: Sequence[int] = (227, 227), name: str = "caffenet", width: float = 1.0) -> keras.Model:
    """BVLC reference CaffeNet up to relu7 (fc8 removed), channels last, Caffe's layer names.

    Args:
        image_size: `(height, width)`, both >= MIN_INPUT_SIDE (199); the paper uses (227, 227).
            `backbones.build_backbone("caffenet", ...)` checks it before building.
        name: the model's name (`backbones` looks a checkpoint's backbone up by it).
        width: multiplies every layer's filter count (rounded to even). 1.0 is CaffeNet; smaller
            values give a thin copy with the same layers (fast tests of the weights plumbing).

    Returns:
        A functional model: "caffe"-preprocessed BGR pixels `(H, W, 3)` → relu7 map
        `(H', W', 4096)`, `(1, 1, 4096)` at 227×227 (56,868,224 parameters).
    """
    height, width_px = (int(v) for v in image_size)
    if min(height, width_px) < MIN_INPUT_SIDE:
        raise ValueError(too_small_message(image_size))
    if not 0.0 < float(width) <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width!r}")
    inputs = keras.Input((height, width_px, 3), name="image")
    x = inputs
    for index, (conv, filters, kernel, stride, pad, groups) in enumerate(CONV_LAYERS, start=1):
        if pad:
            x = keras.layers.ZeroPadding2D(pad, name=f"{conv}_pad")(x)
        if groups > 1:
            x = GroupedConv2D(_filters(filters, width), kernel, groups, strides=stride, name=conv)(x)
        else:
            x = keras.layers.Conv2D(_filters(filters, width), kernel, strides=stride, padding="valid", name=conv)(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
        if conv in POOL_AFTER:
            pool = POOL_AFTER[conv]
            x = _caffe_pool(x, pool)
            if pool in NORM_AFTER:
                x = CaffeLRN(5, 1e-4, 0.75, 1.0, name=NORM_AFTER[pool])(x)
    (fc6, units6), (fc7, units7) = FC_LAYERS
    x = keras.layers.Conv2D(_filters(units6, width), FC6_KERNEL, padding="valid", name=fc6)(x)
    x = keras.layers.ReLU(name="relu6")(x)
    x = keras.layers.Dropout(DROPOUT, name="drop6")(x)
    x = keras.layers.Conv2D(_filters(units7, width), 1, padding="valid", name=fc7)(x)
    x = keras.layers.ReLU(name="relu7")(x)
    return keras.Model(inputs, x, name=name)


if __name__ == "__main__":
    # `python -m reid_keras.models.caffenet convert ...` (the README's spelling): the command is
    # reid_keras.cli.caffenet; it imports this module again under its package name, so CaffeLRN is
    # registered under the name saved files use.
    from reid_keras.cli.caffenet import main

    sys.exit(main())
