"""ResNet-50 cut in two for person search (oim_person_search.txt §3.1, §5.1).

- the **stem**, `conv1` … `conv4_x` (Keras layer `conv4_block6_out`): 1024 channels at stride 16,
  shared by the RPN and the RoI align. `conv1` and every BatchNormalization of the stem are fixed
  "as constant affine transformations" (§5.1): not trainable, and always run in inference mode,
  also while the model trains (`InferenceModeModel`), so their moving statistics never change.
- the **identification net**, `conv5_x` + global average pooling, run on each 14×14×1024 pooled
  region: 2048-d per region. Its BatchNormalization layers stay "as normal" (§5.1): trainable, batch
  statistics in training.

Both parts are re-wired from ONE keras.applications ResNet50 (`build_resnet50`, ImageNet weights
through `models.backbones.build_backbone`: the Keras cache, `WeightsUnavailableWarning` and random
initialisation when the file is missing): their layers are that model's layer objects (no copy), so
`stem.layers + conv5.layers` are exactly the ResNet50's layers plus the two inputs and the pooling.
The stem takes any image size ("caffe" preprocessing, applied by the scene pipeline).

Where the cut is: §3.1 cuts the Caffe ResNet-50 after conv4_3 and runs conv4_4 … conv5_3 on the
RoIs; issue 14 (like SeqNet and torchvision's C4 Faster R-CNN) keeps all of conv4_x in the stem.
Keras' ResNet50 (v1) strides its first conv5 unit on the 1×1 convolution, as the paper's Caffe model
does: 14×14 regions become 7×7 before the pooling.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import keras

from reid_keras.models.backbones import WeightsInfo, build_backbone

STEM_OUTPUT = "conv4_block6_out"  # last layer of conv4_x: the stem's output (§3.1)
CONV5_OUTPUT = "conv5_block3_out"  # last layer of conv5_x, before the global pooling
STEM_STRIDE = 16
STEM_CHANNELS = 1024
CONV5_CHANNELS = 2048
ROI_SIZE = (14, 14)  # §3.1: "pool a 1024 × 14 × 14 region from the stem feature maps"
FROZEN_STEM_CONVS = ("conv1_conv",)  # §5.1: "we fix the first 7 × 7 convolution layer"
# build_backbone builds at a fixed size; the layers are re-wired below at any size, so this only needs
# to be a size keras.applications accepts.
LOADER_IMAGE_SIZE = (224, 224)


@keras.saving.register_keras_serializable(package="reid_keras")
class InferenceModeModel(keras.Model):
    """A functional model whose layers always run in inference mode, whatever `training` the caller passes.

    Keras' functional models hand the caller's `training` to every layer (it overrides a
    `training=False` written into the graph), so a BatchNormalization inside would use batch statistics
    as soon as the enclosing model trains; this model calls its graph with `training=False` instead.
    It freezes no weight by itself (set `trainable=False` on the layers that must not learn) and
    gradients still flow through it. Built like any functional model: `InferenceModeModel(inputs,
    outputs, name=...)`; it saves and loads (`safe_mode=True`) like one.
    """

    def call(self, inputs, training=None, mask=None, **kwargs):
        return super().call(inputs, training=False, mask=mask, **kwargs)


def build_resnet50(weights=None, download_timeout: float = 10.0) -> Tuple[keras.Model, WeightsInfo]:
    """keras.applications ResNet50 without top, weights through the project's loader.

    Args:
        weights: None / "none" (random), "imagenet" (Keras cache or download; when unavailable a
            `WeightsUnavailableWarning` and random initialisation, as for every backbone), or the path of
            a ResNet50 `.h5` / `.weights.h5` file (see `models.backbones.build_backbone`).
        download_timeout: seconds for the DNS check and each socket operation of a download.

    Returns:
        `(resnet, WeightsInfo)`; split it with `split_resnet50`. The trainer records the WeightsInfo.
    """
    return build_backbone("resnet50", LOADER_IMAGE_SIZE, weights=weights, download_timeout=download_timeout)


def _check_input_shape(input_shape) -> Tuple:
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else None
    ok = shape is not None and len(shape) == 3 and shape[2] == 3 and all(
        side is None or (isinstance(side, int) and not isinstance(side, bool) and side >= 32) for side in shape[:2])
    if not ok:
        raise ValueError(f"input_shape must be (height, width, 3) with each side None (any size) or an integer "
                         f">= 32, e.g. (None, None, 3); got {input_shape!r}")
    return shape


def _check_roi_size(roi_size) -> Tuple[int, int]:
    size = tuple(roi_size) if isinstance(roi_size, (list, tuple)) else None
    if size is None or len(size) != 2 or not all(
            isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in size):
        raise ValueError(f"roi_size must be (height, width), two integers >= 1, e.g. {ROI_SIZE} as in the "
                         f"paper (§3.1); got {roi_size!r}")
    return size


def _check_resnet50(resnet) -> None:
    names = {layer.name for layer in getattr(resnet, "layers", ())}
    for name in ("conv1_conv", STEM_OUTPUT, CONV5_OUTPUT):
        if name not in names:
            raise ValueError(f"resnet: {getattr(resnet, 'name', resnet)!r} has no layer {name!r}; expected "
                             "the model of build_resnet50 (keras.applications.ResNet50, include_top=False)")


def _same_layer(layer):
    return layer  # clone_model's clone_function: re-wire the graph, share every layer (no copy)


def freeze_stem(stem: keras.Model) -> keras.Model:
    """Fix `conv1` and every BatchNormalization of `stem` (§5.1): `trainable = False`.

    Call it again after unfreezing a model that contains the stem (`trainable = False`, then `True`:
    Keras sets the flag on every sub-layer). Returns `stem`.
    """
    for layer in stem.layers:
        if layer.name in FROZEN_STEM_CONVS or isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return stem


def split_resnet50(resnet: keras.Model, input_shape: Sequence = (None, None, 3), roi_size: Sequence[int] = ROI_SIZE,
                   name: str = "resnet50") -> Tuple[keras.Model, keras.Model]:
    """Cut a keras.applications ResNet50 into the person-search stem and identification net (§3.1).

    Args:
        resnet: the model of `build_resnet50` (or `keras.applications.ResNet50(include_top=False)`).
        input_shape: the stem's image shape (height, width, 3); None sides take any size.
        roi_size: (height, width) of the pooled regions conv5 takes (paper: 14 × 14).
        name: prefix of the two models' names (`<name>_stem`, `<name>_conv5`).

    Returns:
        `(stem, conv5)`: stem `[B, H, W, 3] -> [B, ceil(H/16), ceil(W/16), 1024]`, an `InferenceModeModel`
        with `conv1` and its BatchNormalization layers frozen; conv5 `[R, 14, 14, 1024] -> [R, 2048]`
        (conv5_x, then global average pooling). Both use `resnet`'s layer objects.
    """
    _check_resnet50(resnet)
    input_shape = _check_input_shape(input_shape)
    roi_size = _check_roi_size(roi_size)
    cut = resnet.get_layer(STEM_OUTPUT).output

    images = keras.Input(input_shape, name="images")
    stem_graph = keras.models.clone_model(keras.Model(resnet.input, cut), input_tensors=images,
                                          clone_function=_same_layer)
    stem = freeze_stem(InferenceModeModel(images, stem_graph.output, name=f"{name}_stem"))

    regions = keras.Input((*roi_size, STEM_CHANNELS), name="roi_features")
    conv5_graph = keras.models.clone_model(keras.Model(cut, resnet.get_layer(CONV5_OUTPUT).output),
                                           input_tensors=regions, clone_function=_same_layer)
    pooled = keras.layers.GlobalAveragePooling2D(name="conv5_pool")(conv5_graph.output)
    conv5 = keras.Model(regions, pooled, name=f"{name}_conv5")
    return stem, conv5


def build_resnet50_parts(weights=None, input_shape: Sequence = (None, None, 3), roi_size: Sequence[int] = ROI_SIZE,
                         download_timeout: float = 10.0) -> Tuple[keras.Model, keras.Model]:
    """`(stem, conv5)` of one ResNet50 (`build_resnet50` then `split_resnet50`): weights shared, not copied.

    Use the two calls directly to keep the `WeightsInfo` (what the weights request actually loaded).

    Example:
        >>> stem, conv5 = build_resnet50_parts("imagenet")
        >>> features = stem(images)                      # [B, H/16, W/16, 1024]
        >>> embedding_input = conv5(roi_align(features, rois))  # [B*R, 2048]
    """
    input_shape, roi_size = _check_input_shape(input_shape), _check_roi_size(roi_size)  # before the slow build
    resnet, _ = build_resnet50(weights, download_timeout)
    return split_resnet50(resnet, input_shape, roi_size)


def build_stem(weights=None, input_shape: Sequence = (None, None, 3), download_timeout: float = 10.0) -> keras.Model:
    """The frozen-BN ResNet-50 stem alone (conv1 … conv4_x, 1024 channels, stride 16); see `split_resnet50`."""
    return build_resnet50_parts(weights, input_shape, download_timeout=download_timeout)[0]


def build_conv5(weights=None, roi_size: Sequence[int] = ROI_SIZE, download_timeout: float = 10.0) -> keras.Model:
    """The identification net alone (conv5_x + global average pooling, [R, 14, 14, 1024] -> [R, 2048])."""
    return build_resnet50_parts(weights, roi_size=roi_size, download_timeout=download_timeout)[1]
