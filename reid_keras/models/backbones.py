"""Backbone factory: keras.applications EfficientNetB0…B5, ResNet50 and VGG16 without top, and our own
CaffeNet (`models/caffenet.py`, keras.applications has none), with `--weights imagenet|none|PATH`.

The siamese model of efficientnet_siamese_cuhk01.txt §II.A–B starts from an ImageNet-trained
EfficientNet; the identification+verification model (identification_verification_embedding.txt
§III-B) from an ImageNet-trained CaffeNet, VGG16 or ResNet-50. ResNet50, VGG16 and CaffeNet have no
preprocessing inside the model: they expect "caffe" input (RGB->BGR minus the ImageNet means,
`reid_keras.data.preprocessing`), which the pipelines apply outside the model
(`BACKBONE_PREPROCESSING`). Everything below about the stem concerns EfficientNet only.

Keras' EfficientNet takes float pixels 0..255 and does its own preprocessing inside
the model (Rescaling 1/255, a Normalization layer holding the ImageNet mean/variance, and — only
when built with `weights="imagenet"` — one more per-channel Rescaling by 1/sqrt(std); see Keras'
`applications/efficientnet.py` and TF issue 49930). That last layer is why ImageNet weights must
come through `weights="imagenet"` (Keras' own cache, `$KERAS_HOME/models` or `~/.keras/models`)
and never through a file path: loading the same file by path builds the stem without it and
silently mis-normalises every image. `build_backbone` therefore:

- `imagenet`: calls the Keras constructor with `weights="imagenet"`. When the cache has no
  `efficientnetbX_notop.h5` (ResNet50 / VGG16: `resnet50_…_notop.h5`, `vgg16_…_notop.h5`,
  see `weights_file_name`) and the download host cannot be resolved or the download fails, it
  warns (naming the file and the cache folder), builds a random-initialised backbone, and says so
  in the returned `WeightsInfo` (the trainer writes it to the run's config.json).
- `none`: random initialisation.
- PATH to a `.h5` / `.weights.h5` backbone weights file: loaded into the architecture. A weights
  file records no layer graph, so the stem is chosen from the file's stem statistics: Keras' ImageNet
  file (and any backbone fine-tuned from it — the layer is not trainable) carries the ImageNet mean,
  a random-initialised backbone keeps mean 0 / variance 1. Non-trivial statistics get the ImageNet
  stem Rescaling inserted exactly as Keras does, so even Keras' own notop file works by path.
  ResNet50 / VGG16 files are loaded as they are (no stem to choose).
- PATH to a `.keras` checkpoint (a whole siamese model or a bare backbone): the backbone inside it
  is re-instantiated at `image_size` with its own stem, and its weights copied.

CaffeNet has no download: `imagenet` loads `<cache>/caffenet_imagenet.weights.h5`, written by
`python -m reid_keras.models.caffenet convert bvlc_reference_caffenet.caffemodel`, and otherwise
warns and starts from random weights as above; a PATH may also be a `.caffemodel` (converted on
the fly). Its inputs must be >= 199 pixels a side (`caffenet.MIN_INPUT_SIDE`; the paper uses 227).
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import threading
import urllib.parse
import warnings
from typing import Optional, Sequence, Tuple

import keras

from reid_keras.models import caffenet as _caffenet

# Keras application constructor per keras.applications backbone: the EfficientNet siamese paper
# evaluates B0 through B5 (§III); the identification+verification paper ResNet-50 and VGG16 (§III-B).
KERAS_BACKBONES = {
    "efficientnetb0": "EfficientNetB0",
    "efficientnetb1": "EfficientNetB1",
    "efficientnetb2": "EfficientNetB2",
    "efficientnetb3": "EfficientNetB3",
    "efficientnetb4": "EfficientNetB4",
    "efficientnetb5": "EfficientNetB5",
    "resnet50": "ResNet50",
    "vgg16": "VGG16",
}
# Backbones built by reid_keras itself (name -> display name): the identification+verification
# paper's third backbone, CaffeNet (§III, ref. [26]).
OWN_BACKBONES = {"caffenet": "CaffeNet"}
BACKBONES = {**KERAS_BACKBONES, **OWN_BACKBONES}
# Where keras.applications downloads EfficientNet weights from (applications/efficientnet.py).
WEIGHTS_ORIGIN = "https://storage.googleapis.com/keras-applications/"
# ResNet50 / VGG16 no-top weights: origin folder and cached file name (applications/resnet.py, vgg16.py).
_CAFFE_WEIGHTS = {
    "resnet50": ("https://storage.googleapis.com/tensorflow/keras-applications/resnet/",
                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "vgg16": ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/",
              "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}
# The `reid_keras.data.preprocessing` name each backbone's input needs (applied by the pipelines).
BACKBONE_PREPROCESSING = {name: ("efficientnet" if name.startswith("efficientnet") else "caffe")
                          for name in BACKBONES}
# keras.applications.efficientnet's per-channel ImageNet std, used by its weights="imagenet" stem.
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
MIN_IMAGE_SIDE = 32  # keras.applications (EfficientNet, ResNet50, VGG16) refuses smaller inputs
CAFFENET_CONVERT = "python -m reid_keras.models.caffenet convert bvlc_reference_caffenet.caffemodel"


class WeightsUnavailableWarning(UserWarning):
    """ImageNet weights were requested but could not be found or downloaded."""


@dataclasses.dataclass
class WeightsInfo:
    """What `--weights` asked for and what the backbone actually got (stored in config.json).

    Attributes:
        requested: "imagenet", "none" or the path given.
        used: "imagenet", "none" (random initialisation), "file" or "checkpoint".
        file: the weights file read, or for a failed "imagenet" the cache file that was missing.
        cache_dir: Keras' weights cache folder (for "imagenet"), else None.
        imagenet_stem: whether the backbone has Keras' ImageNet stem rescaling.
        warning: the warning text printed when ImageNet weights were unavailable, else None.
    """

    requested: str
    used: str
    file: Optional[str] = None
    cache_dir: Optional[str] = None
    imagenet_stem: bool = False
    warning: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def canonical_backbone_name(name: str) -> str:
    """`"EfficientNetB0"`, `"efficientnet_b0"`, `"b0"` → `"efficientnetb0"`, `"ResNet-50"` → `"resnet50"`;
    clear error otherwise."""
    key = str(name).strip().lower().replace("_", "").replace("-", "")
    if key in {f"b{i}" for i in range(6)}:
        key = "efficientnet" + key
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")
    return key


def is_efficientnet(name: str) -> bool:
    """Whether backbone `name` is an EfficientNet (preprocessing and ImageNet stem inside the model)."""
    return canonical_backbone_name(name).startswith("efficientnet")


def backbone_preprocessing(name: str) -> str:
    """The preprocessing name (`reid_keras.data.preprocessing`) backbone `name` expects:
    "efficientnet" (0..255 in, normalised inside the model) or "caffe" (ResNet50, VGG16, CaffeNet)."""
    return BACKBONE_PREPROCESSING[canonical_backbone_name(name)]


def check_image_size(image_size: Sequence[int], name: Optional[str] = None) -> Tuple[int, int]:
    """Validate `(height, width)`; keras.applications' EfficientNet, ResNet50 and VGG16 need both sides >= 32,
    CaffeNet (when `name` says so) >= `caffenet.MIN_INPUT_SIDE` (199)."""
    caffenet = name is not None and canonical_backbone_name(name) == "caffenet"
    minimum = _caffenet.MIN_INPUT_SIDE if caffenet else MIN_IMAGE_SIDE
    try:
        height, width = (int(v) for v in image_size)
        ok = all(float(v) == int(v) for v in image_size)
    except (TypeError, ValueError):
        ok = False
    if ok and min(height, width) >= minimum:
        return height, width
    if caffenet:
        raise ValueError(_caffenet.too_small_message(image_size))
    raise ValueError(f"bad image_size {image_size!r}: expected (height, width), two integers >= "
                     f"{MIN_IMAGE_SIDE}, e.g. (160, 80) as in the paper")


def keras_cache_dir() -> str:
    """The folder `keras.utils.get_file(..., cache_subdir="models")` uses, resolved the same way."""
    try:  # the value Keras read from KERAS_HOME at import time; private, so with a fallback
        from keras.src.backend import config as _config
        home = _config.keras_home()
    except (ImportError, AttributeError):
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):  # get_file falls back to /tmp/.keras in that case
        home = os.path.join("/tmp", ".keras")
    return os.path.join(home, "models")


def weights_file_name(name: str) -> str:
    """File name keras.applications caches the no-top ImageNet weights of backbone `name` under
    (for CaffeNet: the file our converter writes there)."""
    name = canonical_backbone_name(name)
    if name == "caffenet":
        return _caffenet.WEIGHTS_FILE
    if name in _CAFFE_WEIGHTS:
        return _CAFFE_WEIGHTS[name][1]
    return f"{name}_notop.h5"


def weights_origin(name: str) -> str:
    """URL keras.applications downloads the no-top ImageNet weights of backbone `name` from.

    Raises:
        ValueError: for CaffeNet, which has no download (convert the Caffe model instead).
    """
    name = canonical_backbone_name(name)
    if name in OWN_BACKBONES:
        raise ValueError(f"{name} has no download URL: convert the BVLC model with `{CAFFENET_CONVERT}`")
    folder = _CAFFE_WEIGHTS[name][0] if name in _CAFFE_WEIGHTS else WEIGHTS_ORIGIN
    return folder + weights_file_name(name)


def host_resolves(host: str, timeout: float) -> bool:
    """Whether DNS resolves `host` within `timeout` seconds (getaddrinfo itself has no timeout)."""
    result = []

    def lookup():
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _build_caffenet(include_top=False, weights=None, input_shape=None):
    """keras.applications' constructor signature for CaffeNet (fc8 never built, weights set by the caller)."""
    return _caffenet.build_caffenet(input_shape[:2], name="caffenet")


def _constructor(name: str):
    if name == "caffenet":
        return _build_caffenet
    return getattr(keras.applications, KERAS_BACKBONES[name])


def caffenet_weights_path() -> str:
    """`<Keras cache folder>/caffenet_imagenet.weights.h5`: where `weights="imagenet"` looks for CaffeNet."""
    return os.path.join(keras_cache_dir(), _caffenet.WEIGHTS_FILE)


def _build_caffenet_imagenet(shape) -> Tuple[keras.Model, WeightsInfo]:
    cache_dir = keras_cache_dir()
    cached = caffenet_weights_path()
    model = _build_caffenet(input_shape=shape)
    if not os.path.exists(cached):
        reason = "no such file"
    else:
        try:
            model.load_weights(cached)
            return model, WeightsInfo("imagenet", "imagenet", file=cached, cache_dir=cache_dir)
        except Exception as err:  # h5py and Keras raise several types for a damaged or mismatching file
            reason = f"{type(err).__name__}: {err}"
            model = _build_caffenet(input_shape=shape)  # load_weights may have set some layers
    text = (f"ImageNet weights for caffenet are unavailable: {_caffenet.WEIGHTS_FILE} is not usable in the Keras "
            f"cache folder {cache_dir} ({reason}), and there is no download for CaffeNet (keras.applications has "
            "none). The backbone starts from RANDOM initialisation. To train from ImageNet, get "
            f"bvlc_reference_caffenet.caffemodel (Caffe model zoo) and run `{CAFFENET_CONVERT}`, which writes "
            f"{_caffenet.WEIGHTS_FILE} into {cache_dir} (or set KERAS_HOME), then run again.")
    warnings.warn(text, WeightsUnavailableWarning, stacklevel=3)
    return model, WeightsInfo("imagenet", "none", file=cached, cache_dir=cache_dir, warning=text)


def _build_imagenet(name, shape, timeout) -> Tuple[keras.Model, WeightsInfo]:
    if name == "caffenet":
        return _build_caffenet_imagenet(shape)
    cache_dir = keras_cache_dir()
    file_name = weights_file_name(name)
    cached = os.path.join(cache_dir, file_name)
    origin = weights_origin(name)
    reason = None
    if not os.path.exists(cached):
        host = urllib.parse.urlsplit(origin).hostname
        if not host_resolves(host, timeout):
            reason = f"{host} cannot be resolved (no network?)"
    if reason is None:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # Keras' urlretrieve has no timeout of its own
        try:
            model = _constructor(name)(include_top=False, weights="imagenet", input_shape=shape)
            # Only EfficientNet gets a stem layer from weights="imagenet"; ResNet50 / VGG16 have none.
            return model, WeightsInfo("imagenet", "imagenet", file=cached, cache_dir=cache_dir,
                                      imagenet_stem=is_efficientnet(name))
        except Exception as err:  # Keras wraps URL errors in a bare Exception; hash errors are ValueError
            reason = f"{type(err).__name__}: {err}"
        finally:
            socket.setdefaulttimeout(previous)
    text = (f"ImageNet weights for {name} are unavailable: {file_name} is not usable in the Keras cache "
            f"folder {cache_dir} and could not be downloaded from {origin} ({reason}). The backbone starts "
            f"from RANDOM initialisation. To train from ImageNet, copy {file_name} into {cache_dir} "
            "(or set KERAS_HOME) and run again.")
    warnings.warn(text, WeightsUnavailableWarning, stacklevel=3)
    model = _constructor(name)(include_top=False, weights=None, input_shape=shape)
    return model, WeightsInfo("imagenet", "none", file=cached, cache_dir=cache_dir, warning=text)


def _stem_normalization(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            return layer
    raise ValueError(f"{model.name}: no Normalization layer in the stem; not a keras.applications EfficientNet")


def _has_imagenet_statistics(model: keras.Model) -> bool:
    norm = _stem_normalization(model)
    mean = keras.ops.convert_to_numpy(norm.adapt_mean)
    variance = keras.ops.convert_to_numpy(norm.adapt_variance)
    return bool(abs(mean).max() > 1e-6 or abs(variance - 1.0).max() > 1e-6)


def _rebuild(source: keras.Model, shape, add_imagenet_stem: bool) -> keras.Model:
    """Re-instantiate `source`'s graph at input `shape` (optionally inserting Keras' ImageNet stem
    Rescaling after the Normalization layer) and copy its weights."""

    def call(layer, *args, **kwargs):
        out = layer(*args, **kwargs)
        if add_imagenet_stem and isinstance(layer, keras.layers.Normalization):
            out = keras.layers.Rescaling([1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB])(out)
        return out

    clone = keras.models.clone_model(source, input_tensors=keras.Input(shape), call_function=call)
    clone.set_weights(source.get_weights())
    for layer in clone.layers:  # set_weights does not refresh Normalization's cached mean/variance
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()
    return clone


def _copy_caffenet(source: keras.Model, shape) -> keras.Model:
    """A fresh CaffeNet at `shape` with `source`'s weights: cloning would keep `source`'s size-dependent
    ceil-mode pooling pads, so the weights are copied layer by layer instead."""
    model = _build_caffenet(input_shape=shape)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())
    return model


def _find_backbone(model: keras.Model, name: str, path: str) -> keras.Model:
    found = []

    def walk(layer):
        if isinstance(layer, keras.Model):
            if layer.name in BACKBONES:
                found.append(layer)
                return
            for child in layer.layers:
                walk(child)

    walk(model)
    if not found:
        raise ValueError(f"{path}: no backbone (a sub-model named {'/'.join(BACKBONES)}) in this checkpoint")
    if found[0].name != name:
        raise ValueError(f"{path}: the checkpoint's backbone is {found[0].name}, but {name} was requested")
    return found[0]


def _build_from_path(name, shape, path) -> Tuple[keras.Model, WeightsInfo]:
    if path.endswith(".keras"):
        from reid_keras.models import layers as _layers  # noqa: F401  (registers SquareLayer etc.)
        from reid_keras.models.loading import load_keras_model

        loaded = load_keras_model(path)  # a ModelLoadError (a ValueError) names the file and what is wrong
        source = _find_backbone(loaded, name, path)
        if name == "caffenet":
            return _copy_caffenet(source, shape), WeightsInfo(path, "checkpoint", file=os.path.abspath(path))
        stem = any(isinstance(layer, keras.layers.Rescaling) and isinstance(previous, keras.layers.Normalization)
                   for previous, layer in zip(source.layers, source.layers[1:]))
        return _rebuild(source, shape, add_imagenet_stem=False), WeightsInfo(
            path, "checkpoint", file=os.path.abspath(path), imagenet_stem=stem)
    if path.endswith(".caffemodel"):
        if name != "caffenet":
            raise ValueError(f"weights file {path!r}: a .caffemodel is only for the caffenet backbone, not {name}")
        model = _build_caffenet(input_shape=shape)
        from reid_keras.models.caffe_weights import load_caffemodel

        load_caffemodel(path, model)
        return model, WeightsInfo(path, "file", file=os.path.abspath(path))
    if not path.endswith(".h5"):
        raise ValueError(f"weights file {path!r}: expected a backbone .h5 / .weights.h5 file or a .keras checkpoint"
                         + (" or a .caffemodel" if name == "caffenet" else ""))
    model = _constructor(name)(include_top=False, weights=None, input_shape=shape)
    try:
        model.load_weights(path)
    except Exception as err:  # h5py and Keras raise several types for a mismatching file
        raise ValueError(f"{path}: cannot load it as {name} backbone weights (include_top=False): "
                         f"{type(err).__name__}: {err}") from None
    # ResNet50 / VGG16 have no normalisation inside the model: their files load as they are.
    stem = is_efficientnet(name) and _has_imagenet_statistics(model)
    if stem:
        model = _rebuild(model, shape, add_imagenet_stem=True)
    return model, WeightsInfo(path, "file", file=os.path.abspath(path), imagenet_stem=stem)


def build_backbone(name: str = "efficientnetb0", image_size: Sequence[int] = (160, 80), weights=None,
                   download_timeout: float = 10.0) -> Tuple[keras.Model, WeightsInfo]:
    """Build a keras.applications EfficientNet, ResNet50 or VGG16 without top, or CaffeNet without fc8
    (spatial feature map output).

    Args:
        name: "efficientnetb0" … "efficientnetb5" (also accepts "b0", "EfficientNetB0"), "resnet50",
            "vgg16" or "caffenet".
        image_size: `(height, width)` of the input; the EfficientNet paper uses (160, 80), the
            identification+verification paper (224, 224), (227, 227) for CaffeNet (>= 199 needed).
        weights: "imagenet", None / "none", or a path (see the module docstring for each case).
        download_timeout: seconds for the DNS check and each socket operation of the download.

    Returns:
        `(backbone, WeightsInfo)`. The backbone is named after `name` (Keras derives the cache file
        name from it). EfficientNets take float32 RGB pixels in 0..255; ResNet50, VGG16 and CaffeNet
        take "caffe"-preprocessed pixels (`backbone_preprocessing(name)`), applied outside the model.

    Raises:
        ValueError: unknown backbone, bad image size, missing or unloadable weights file.
    """
    name = canonical_backbone_name(name)
    height, width = check_image_size(image_size, name)
    shape = (height, width, 3)
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in ("none", "")):
        return _constructor(name)(include_top=False, weights=None, input_shape=shape), WeightsInfo("none", "none")
    weights = os.fspath(weights)
    if weights.strip().lower() == "imagenet":
        return _build_imagenet(name, shape, download_timeout)
    path = os.path.expanduser(weights)
    if not os.path.isfile(path):
        raise ValueError(f"--weights {weights!r}: no such file; expected imagenet, none, or the path of a "
                         ".h5 / .weights.h5 backbone weights file or a .keras checkpoint (or, for caffenet, "
                         "a .caffemodel)")
    return _build_from_path(name, shape, path)
