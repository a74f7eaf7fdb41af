"""Activation maps of an intermediate backbone block (identification-verification paper §IV, Fig. 5).

The paper feeds one image to the ResNet-50 trained with identification (I), verification (V) or
both (I+V) losses, takes the activation of "res4fx" (14x14 at 224x224: the output of the last
conv4 block, Keras' `conv4_block6_out`) and shows the sum of the activation maps over channels.
Here, for each model and image:

    map = normalise_0..1( bilinear_resize( sum_c relu(F[:, :, c]), image size ) )

where F is the feature map of the chosen layer for the image resized and normalised exactly as the
training pipeline does it (`data.decoding.decode_image`, bilinear resize, `data.preprocessing`).
Default layers: ResNet-50 `conv4_block6_out`; EfficientNet `block6a_expand_activation` (the last
stride-16 activation, present in B0...B5, before block6a's stride-2 depthwise convolution); VGG16
`block5_conv3` (14x14 at 224x224, like res4fx); CaffeNet `relu5` (conv5's activations, 13x13 at
227x227). `active_fraction` is the share of feature-map units > 0, the number behind the paper's
"our model activates more neurons".

    python -m reid_keras.visualize activations --model runs/i/best.keras runs/v/best.keras \
        runs/iv/best.keras --labels I V I+V --dataset market1501 --data-root data/market \
        --num-images 3 --out fig5.png --npz fig5.npz
"""
from __future__ import annotations

import difflib
import os
import sys
from typing import Optional, Sequence

import numpy as np

from reid_keras.io_utils import atomic_write

# (layer name, backbone) in the order they are tried when no layer is given.
DEFAULT_LAYERS = (("conv4_block6_out", "ResNet-50"), ("block6a_expand_activation", "EfficientNet"),
                  ("block5_conv3", "VGG16"), ("relu5", "CaffeNet"))
# The paper's Caffe layer names -> Keras' (Caffe ResNet-50 "res4f" is the 6th conv4 block).
LAYER_ALIASES = {"res4fx": "conv4_block6_out", "res4f": "conv4_block6_out", "res5c": "conv5_block3_out"}
PANEL_HEIGHT = 2.0  # inches per image row (dpi 100), see `figure_size`
DPI = 100


class ActivationMapError(ValueError):
    """Bad input to the activation-map tool (names the file or argument and what was expected)."""


def _walk(model):
    """Every layer of `model` and of its nested sub-models, depth first."""
    import keras

    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _walk(layer)


def _spatial_shape(layer):
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # never called, or several outputs
        return None
    return tuple(shape[1:3]) if len(shape) == 4 else None


def candidate_layers(model, limit: int = 8) -> list:
    """Stage outputs: for each feature-map size, the last layer of that size, "name (HxW)".

    A size followed later by a larger one is a side branch (squeeze-excitation 1x1 maps), not a stage.
    """
    import keras

    rows = [(layer.name, _spatial_shape(layer)) for layer in _walk(model)
            if not isinstance(layer, (keras.Model, keras.layers.ZeroPadding2D, keras.layers.InputLayer))]
    rows = [(name, shape) for name, shape in rows if shape is not None and None not in shape]
    last = {shape: i for i, (_, shape) in enumerate(rows)}
    ends = [f"{rows[i][0]} ({shape[0]}x{shape[1]})" for shape, i in sorted(last.items(), key=lambda kv: kv[1])
            if all(h * w <= shape[0] * shape[1] for _, (h, w) in rows[i + 1:])]
    return ends[-limit:]


def _layer_error(model, layer: str, source: str) -> ActivationMapError:
    names = [sub.name for sub in _walk(model) if _spatial_shape(sub) is not None]
    close = difflib.get_close_matches(layer, names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ActivationMapError(f"{source}: no layer {layer!r} with a 4-D (N, H, W, C) output in the embedding "
                              f"network or its backbone; {hint}stage outputs: {', '.join(candidate_layers(model))}")


def default_layer(model, source: str = "model") -> str:
    """The paper's block for the backbone inside `model` (see DEFAULT_LAYERS)."""
    names = {layer.name for layer in _walk(model)}
    for name, _ in DEFAULT_LAYERS:
        if name in names:
            return name
    known = ", ".join(f"{n} ({b})" for n, b in DEFAULT_LAYERS)
    raise ActivationMapError(f"{source}: no known backbone block ({known}); pass --layer, one of the stage "
                             f"outputs: {', '.join(candidate_layers(model))}")


def cut_at_layer(model, layer: str, source: str = "model"):
    """`keras.Model` from `model`'s input to layer `layer`'s output, `layer` possibly inside nested
    sub-models (image -> embedding -> backbone); returns `(feature model, owner model name)`."""
    import keras

    for child in model.layers:
        if child.name == layer and _spatial_shape(child) is not None:
            return keras.Model(model.input, child.output, name=f"{model.name}_to_{layer}"), model.name
    for child in model.layers:
        if isinstance(child, keras.Model) and any(sub.name == layer for sub in _walk(child)):
            inner, owner = cut_at_layer(child, layer, source)
            # Keras has no public accessor for where a nested model is called in its parent's graph
            # (`Functional.input` returns the sub-model's own Input), hence the private node list.
            nodes = getattr(child, "_inbound_nodes", [])
            if len(nodes) != 1:
                raise ActivationMapError(f"{source}: sub-model {child.name!r} is called {len(nodes)} times in "
                                         f"{model.name!r}; expected once to cut the graph at {layer!r}")
            inputs = nodes[0].input_tensors
            out = inner(inputs[0] if len(inputs) == 1 else inputs)
            return keras.Model(model.input, out, name=f"{model.name}_to_{layer}"), owner
    raise _layer_error(model, layer, source)


def _backbone_preprocessing(model) -> Optional[str]:
    """The preprocessing named like a nested sub-model ("resnet50", "vgg16", "efficientnetb0"), or None."""
    import keras

    from reid_keras.data.preprocessing import check_preprocessing

    for layer in _walk(model):
        if isinstance(layer, keras.Model):
            try:
                return check_preprocessing(layer.name)
            except ValueError:
                continue
    return None


class ActivationModel:
    """One trained model cut at `layer`: raw 0..255 images -> feature maps (see `load_activation_model`)."""

    def __init__(self, network, layer: Optional[str] = None, preprocessing: Optional[str] = None,
                 source: str = "model"):
        from reid_keras.models.loading import _preprocess_fn

        self.source = source
        self.layer = LAYER_ALIASES.get(layer, layer) if layer else default_layer(network, source)
        self.feature_model, self.owner = cut_at_layer(network, self.layer, source)
        shape = tuple(network.inputs[0].shape)
        if shape[1] is None or shape[2] is None:
            raise ActivationMapError(f"{source}: the embedding network has no fixed input size {shape[1:3]}; "
                                     "activation maps need one")
        self.image_size = (int(shape[1]), int(shape[2]))
        self.preprocessing = preprocessing or _backbone_preprocessing(network)
        self._pre = _preprocess_fn(self.preprocessing)

    def feature_maps(self, images, batch_size: int = 16) -> np.ndarray:
        """(N, h, w, C) float32 feature maps of raw images (N, H, W, 3), pixel values 0..255."""
        images = np.asarray(images, dtype=np.float32)
        if images.shape[1:] != (*self.image_size, 3):
            raise ActivationMapError(f"{self.source}: images of shape {images.shape[1:]} given; the model takes "
                                     f"{(*self.image_size, 3)}")
        out = [np.asarray(self.feature_model(self._pre(images[i:i + batch_size]), training=False), np.float32)
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out)


def load_activation_model(path: str, layer: Optional[str] = None,
                          preprocessing: Optional[str] = None) -> ActivationModel:
    """Load a `.keras` file saved by the trainer and cut its embedding branch at `layer`.

    Preprocessing: `preprocessing` if given, else the run's config.json beside the file, else the
    backbone's own (a sub-model named resnet50 / vgg16 / efficientnet...), else none (raw 0..255).
    """
    from reid_keras.models.loading import (ModelLoadError, _embedding_network, _sidecar_preprocessing,
                                          load_keras_model)

    if not os.path.isfile(path) or not path.endswith(".keras"):
        what = "does not exist" if not os.path.exists(path) else "is not a .keras file"
        raise ModelLoadError(f"model {path!r} {what}: expected a .keras file saved by python -m reid_keras.train")
    model = load_keras_model(path)  # names what is wrong with a damaged file, refuses NaN / inf weights
    return ActivationModel(_embedding_network(model, path), layer,
                           preprocessing or _sidecar_preprocessing(path), source=path)


def check_image(path: str) -> None:
    """Raise ActivationMapError naming `path` unless it is an existing, complete image file."""
    from reid_keras.data.imagefiles import probe_image_file

    if not os.path.isfile(path):
        raise ActivationMapError(f"image {path!r} does not exist or is not a file")
    reason = probe_image_file(path)
    if reason is not None:
        raise ActivationMapError(f"image {path!r} cannot be used: {reason}")


def read_image(path: str, size: Sequence[int]) -> np.ndarray:
    """(H, W, 3) float32 RGB 0..255 of image file `path`, decoded and resized as in training."""
    import tensorflow as tf  # the training pipeline's decoder and resize, so the pixels match

    from reid_keras.data.decoding import decode_image

    check_image(path)
    try:
        image = decode_image(tf.io.read_file(path), path)
    except tf.errors.OpError as err:
        raise ActivationMapError(f"image {path!r} cannot be decoded: {err.message.splitlines()[0]}") from None
    return tf.image.resize(image, tuple(size), method="bilinear").numpy()


def channel_sum_maps(feature_maps, size: Sequence[int]):
    """Fig. 5 maps: ReLU, sum over channels, bilinear resize to `size`, per-image min-max to 0..1.

    Returns `(maps (N, H, W) in 0..1, raw (N, h, w) channel sums before resizing)`; a constant map
    becomes all zeros.
    """
    import keras

    summed = keras.ops.sum(keras.ops.relu(keras.ops.convert_to_tensor(feature_maps, "float32")), axis=-1)
    resized = keras.ops.image.resize(summed[..., None], tuple(size), interpolation="bilinear")[..., 0]
    raw, up = keras.ops.convert_to_numpy(summed), keras.ops.convert_to_numpy(resized).astype(np.float64)
    low = up.min(axis=(1, 2), keepdims=True)
    span = up.max(axis=(1, 2), keepdims=True) - low
    maps = np.where(span > 0, (up - low) / np.where(span > 0, span, 1.0), 0.0)
    return maps.astype(np.float32), raw.astype(np.float32)


def compute_activation_maps(models: Sequence[ActivationModel], image_paths: Sequence[str]) -> dict:
    """Maps of every image under every model, at the first model's input size.

    Returns a dict: `images` (N, H, W, 3) uint8 as shown, `maps` (M, N, H, W) in 0..1,
    `raw_maps` (list of M arrays (N, h, w)), `active_fraction` (M, N), `layers`, `paths`.
    """
    if not models or not image_paths:
        raise ActivationMapError("need at least one model and one image")
    size = models[0].image_size
    cache = {}
    maps, raws, active = [], [], []
    for model in models:
        if model.image_size not in cache:
            cache[model.image_size] = np.stack([read_image(p, model.image_size) for p in image_paths])
        features = model.feature_maps(cache[model.image_size])
        up, raw = channel_sum_maps(features, size)
        maps.append(up)
        raws.append(raw)
        active.append((features > 0).reshape(len(features), -1).mean(axis=1))
    shown = cache.get(size)
    shown = np.stack([read_image(p, size) for p in image_paths]) if shown is None else shown
    return {"images": np.clip(np.rint(shown), 0, 255).astype(np.uint8), "maps": np.stack(maps), "raw_maps": raws,
            "active_fraction": np.stack(active).astype(np.float32), "layers": [m.layer for m in models],
            "paths": [str(p) for p in image_paths]}


def figure_size(num_images: int, num_models: int, image_size: Sequence[int]) -> tuple:
    """(width, height) in pixels of the figure: rows of PANEL_HEIGHT inches, panels at the image's
    aspect ratio, plus room for titles (0.45 in per row, 0.5 in on top) and the colour bar (0.9 in)."""
    height, width = image_size
    w_in = (1 + num_models) * (PANEL_HEIGHT * width / height + 0.25) + 0.9
    h_in = num_images * (PANEL_HEIGHT + 0.45) + 0.5
    return int(round(w_in * DPI)), int(round(h_in * DPI))


def plot_activation_maps(result: dict, labels: Sequence[str], path: str, alpha: float = 0.5,
                         title: str = "Activation maps (channel sum)") -> str:
    """One figure: a row per image, the image then one jet overlay per model titled by its label."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # Agg canvas via Figure.savefig: no pyplot, no display

    images, maps = result["images"], result["maps"]
    if len(labels) != len(maps):
        raise ActivationMapError(f"{len(labels)} labels for {len(maps)} models: give one label per model")
    w_px, h_px = figure_size(len(images), len(maps), images.shape[1:3])
    fig = Figure(figsize=(w_px / DPI, h_px / DPI), dpi=DPI, layout="constrained")
    axes = np.asarray(fig.subplots(len(images), 1 + len(maps), squeeze=False))
    for r, image in enumerate(images):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(os.path.basename(result["paths"][r])[:28], fontsize=7)
        for m, label in enumerate(labels):
            ax = axes[r, m + 1]
            ax.imshow(image)
            ax.imshow(maps[m, r], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
            ax.set_title(f"{label}\n{100 * result['active_fraction'][m, r]:.0f}% units > 0", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps["jet"]), ax=axes, fraction=0.05, shrink=0.8,
                 label="normalised channel sum")
    fig.suptitle(f"{title}\nlayer {', '.join(dict.fromkeys(result['layers']))}", fontsize=8)
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=ext))


def save_maps(result: dict, labels: Sequence[str], path: str) -> str:
    """The maps as a compressed `.npz` (keys: images, maps, raw_maps_<k>, active_fraction, labels, layers, paths)."""
    arrays = {"images": result["images"], "maps": result["maps"], "active_fraction": result["active_fraction"],
              "labels": np.asarray(list(labels), dtype=str), "layers": np.asarray(result["layers"], dtype=str),
              "paths": np.asarray(result["paths"], dtype=str)}
    arrays.update({f"raw_maps_{k}": raw for k, raw in enumerate(result["raw_maps"])})
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def run(model_paths: Sequence[str], image_paths: Sequence[str], out: str, labels: Optional[Sequence[str]] = None,
        layer: Optional[str] = None, preprocessing: Optional[str] = None, npz: Optional[str] = None) -> dict:
    """Load each model, compute the maps, write the figure `out` (and `npz`); returns the result dict."""
    labels = list(labels) if labels else [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in model_paths]
    if len(labels) != len(model_paths):
        raise ActivationMapError(f"labels: {len(labels)} labels ({' '.join(labels)}) for {len(model_paths)} "
                                 "models; give one label per model")
    missing = [p for p in model_paths if not os.path.exists(p)]
    if missing:
        raise ActivationMapError(f"model {missing[0]!r} does not exist: expected a .keras file")
    for p in image_paths:  # fail before loading any model
        check_image(p)
    models = [load_activation_model(p, layer, preprocessing) for p in model_paths]
    for m in models:
        print(f"{m.source}: layer {m.layer} of {m.owner}, preprocessing {m.preprocessing or 'none (raw 0..255)'}",
              file=sys.stderr)
    result = compute_activation_maps(models, image_paths)
    result["labels"] = labels
    result["figure"] = plot_activation_maps(result, labels, out)
    if npz:
        result["npz"] = save_maps(result, labels, npz)
    return result
