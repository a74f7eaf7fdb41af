"""Caffe `.caffemodel` weights for our CaffeNet (`models/caffenet.py`): read, assign, convert.

`read_caffemodel` decodes the protobuf wire format itself (no caffe / protobuf package): NetParameter
`layer` (field 100, LayerParameter name=1 blobs=7), the legacy `layers` (field 2, V1LayerParameter
name=4 blobs=6) and V0 layers nested in them; BlobProto `shape` (7) or num/channels/height/width
(1-4), data packed or repeated. `caffe_to_keras` assigns Caffe's (out, in/groups, kh, kw) kernels as
Keras' (kh, kw, in/groups, out); fc6's (4096, 256*6*6) C,H,W-ordered matrix becomes the 6x6 conv.
CLI: `python -m reid_keras.models.caffenet convert bvlc_reference_caffenet.caffemodel [--out PATH]`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import keras
import numpy as np

from reid_keras.models import caffenet
from reid_keras.models.caffenet import WEIGHT_LAYERS, WEIGHTS_FILE

# ---- Caffe weights: protobuf wire format (developers.google.com/protocol-buffers/docs/encoding) ----

class _WireError(ValueError):
    pass


def _varint(buf, pos: int, end: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError(f"bad varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value): an int for varints, `(start, end)` bytes for the others."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _WireError(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = (pos, pos + size), pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + size), pos + size
        else:  # 3 / 4 (groups) are not used by caffe.proto; 6 / 7 do not exist
            raise _WireError(f"unsupported wire type {wire} at byte {pos}")
        if pos > end:
            raise _WireError(f"field {field} runs past the end of its message (byte {end})")
        yield field, wire, value


def _floats(buf, span, wire: int, dtype: str) -> np.ndarray:
    start, end = span
    size = np.dtype(dtype).itemsize
    if wire == 2 and (end - start) % size:
        raise _WireError(f"packed {dtype} field of {end - start} bytes at byte {start}")
    return np.frombuffer(buf, dtype=dtype, count=(end - start) // size, offset=start)


def _blob(buf, start: int, end: int) -> np.ndarray:
    """BlobProto: shape=7 (BlobShape dim=1), legacy num/channels/height/width=1..4, data=5, double_data=8."""
    legacy, shape, chunks = {}, None, []
    for field, wire, value in _fields(buf, start, end):
        if field in (1, 2, 3, 4) and wire == 0:
            legacy[field] = value
        elif field == 7 and wire == 2:
            shape = []
            for dim_field, dim_wire, dim in _fields(buf, *value):
                if dim_field == 1 and dim_wire == 0:
                    shape.append(dim)
                elif dim_field == 1 and dim_wire == 2:  # packed dims
                    pos, stop = dim
                    while pos < stop:
                        number, pos = _varint(buf, pos, stop)
                        shape.append(number)
        elif field == 5 and wire in (2, 5):
            chunks.append(_floats(buf, value, wire, "<f4"))
        elif field == 8 and wire in (1, 2):
            chunks.append(_floats(buf, value, wire, "<f8"))
    data = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if legacy:  # Caffe's Blob::FromProto: any legacy field means the 4-D (num, channels, height, width)
        shape = [legacy.get(field, 0) for field in (1, 2, 3, 4)]
    elif shape is None:
        shape = [data.size]
    if math.prod(shape) != data.size:
        raise _WireError(f"blob of shape {tuple(shape)} holds {data.size} values (byte {start})")
    return data.reshape(shape)


def _layer(buf, span, name_field: int, blobs_field: int, v0_field=None) -> Tuple[str, List[np.ndarray]]:
    name, blobs = "", []
    for field, wire, value in _fields(buf, *span):
        if field == name_field and wire == 2:
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif field == blobs_field and wire == 2:
            blobs.append(_blob(buf, *value))
        elif field == v0_field and wire == 2:  # V1LayerParameter.layer: a V0LayerParameter (name=1, blobs=50)
            old_name, old_blobs = _layer(buf, value, 1, 50)
            name, blobs = name or old_name, blobs or old_blobs
    return name, blobs


def read_caffemodel(path: str) -> Dict[str, List[np.ndarray]]:
    """Read a binary `.caffemodel` (a NetParameter) without Caffe: `{layer name: [weights, bias, ...]}`
    for every layer holding blobs, in file order, each blob float32 in its Caffe shape.

    Understands NetParameter field 100 `layer` (LayerParameter: name=1, blobs=7) and the legacy field 2
    `layers` (V1LayerParameter: name=4, blobs=6, or a nested V0LayerParameter), which is what the model
    zoo's bvlc_reference_caffenet.caffemodel uses. A V1 blob's shape is the legacy 4-D
    (num, channels, height, width), e.g. (1, 1, 4096, 9216) for fc6.

    Raises:
        ValueError: naming `path`, when the file cannot be read, is not protobuf, or has no layer with blobs.
    """
    try:
        with open(path, "rb") as handle:
            buf = handle.read()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the Caffe model ({err.strerror or err})") from None
    layers: Dict[str, List[np.ndarray]] = {}
    try:
        for field, wire, value in _fields(buf, 0, len(buf)):
            if wire != 2:
                continue
            if field == 100:
                name, blobs = _layer(buf, value, 1, 7)
            elif field == 2:
                name, blobs = _layer(buf, value, 4, 6, v0_field=1)
            else:
                continue
            if blobs:
                layers[name] = blobs
    except _WireError as err:
        raise ValueError(f"{path}: not a binary .caffemodel (protobuf NetParameter): {err}") from None
    if not layers:
        raise ValueError(f"{path}: not a binary .caffemodel: no layer with weights (expected NetParameter "
                         "field 100 'layer' or legacy field 2 'layers' holding blobs)")
    return layers


def _strip_leading_ones(shape) -> tuple:
    shape = tuple(int(v) for v in shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def caffe_to_keras(blobs: Dict[str, List[np.ndarray]], model: keras.Model, source: str = "Caffe blobs") -> List[str]:
    """Assign Caffe blobs to a `build_caffenet` model; returns the layers assigned (conv1 … fc7).

    Conv kernels go from Caffe's (out, in/groups, kh, kw) to Keras' (kh, kw, in/groups, out) (Caffe's
    group g uses the g-th slices of input and output channels, as Keras' `groups` does). fc6's
    (4096, 9216) InnerProduct reads pool5 in (C, H, W) order: reshaped to (4096, 256, 6, 6) and
    transposed to (6, 6, 256, 4096); fc7's (4096, 4096) becomes (1, 1, 4096, 4096). Biases are
    used as they are; other layers (fc8, ...) are ignored. `source` names the blobs in errors.

    Raises:
        ValueError: a layer is missing or a blob does not fit the model.
    """
    for name in WEIGHT_LAYERS:
        try:
            model.get_layer(name)
        except ValueError:
            raise ValueError(f"{model.name}: no layer {name!r}; expected a model from build_caffenet") from None
        if name not in blobs:
            raise ValueError(f"{source}: no layer {name!r} with weights (it has: {', '.join(blobs) or 'none'}); "
                             "expected a CaffeNet / AlexNet-style model with conv1..conv5, fc6, fc7")
    values = []  # checked for every layer before any is assigned: a bad file leaves the model as it was
    for name in WEIGHT_LAYERS:
        layer, arrays = model.get_layer(name), blobs[name]
        if len(arrays) != 2:
            raise ValueError(f"{source}: layer {name!r} has {len(arrays)} blobs, expected 2 (weights, bias)")
        kh, kw, cin, out = (int(v) for v in layer.kernel.shape)
        weights, bias = np.asarray(arrays[0], np.float32), np.asarray(arrays[1], np.float32)
        expected = (out, cin, kh, kw) if name.startswith("conv") else (out, cin * kh * kw)
        if _strip_leading_ones(weights.shape) != _strip_leading_ones(expected):
            raise ValueError(f"{source}: layer {name!r} weights have shape {weights.shape}, expected {expected}")
        if bias.size != out:
            raise ValueError(f"{source}: layer {name!r} bias has shape {bias.shape}, expected ({out},)")
        values.append((layer, weights.reshape(out, cin, kh, kw).transpose(2, 3, 1, 0), bias.reshape(out)))
    for layer, kernel, bias in values:
        layer.set_weights([kernel, bias])
    return list(WEIGHT_LAYERS)


def load_caffemodel(path: str, model: keras.Model) -> List[str]:
    """`caffe_to_keras(read_caffemodel(path), model)`, errors naming `path`; returns the layers assigned."""
    return caffe_to_keras(read_caffemodel(path), model, source=path)


def convert(caffemodel: str, out: str) -> Tuple[str, keras.Model, List[str]]:
    """Convert `caffemodel` to Keras backbone weights at `out` (`backbones.caffenet_weights_path()` is where
    `weights="imagenet"` looks), written atomically. Returns `(out, model, ignored Caffe layers with weights)`."""
    from reid_keras.io_utils import atomic_write

    if not str(out).endswith(".weights.h5"):
        raise ValueError(f"out {out!r}: must end in .weights.h5 (Keras' weights format)")
    blobs = read_caffemodel(caffemodel)
    model = caffenet.build_caffenet()  # looked up at call time (tests swap in a thin copy)
    caffe_to_keras(blobs, model, source=caffemodel)
    atomic_write(out, model.save_weights)
    return out, model, [name for name in blobs if name not in WEIGHT_LAYERS]
