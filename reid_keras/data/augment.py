"""On-the-fly training augmentation inside tf.data: flip, zoom, shifts, resize + random crop, erasing.

Augmentation runs on decoded 0..255 float images *before* backbone normalisation, so every op
keeps values inside [0, 255] (bilinear sampling interpolates, padding and erasing fill with values
in range) and the normalised range of `preprocessing_for(...)` is preserved.

Randomness comes from stateless TF ops seeded per element (the pipelines give each element its
own seed from `tf.data.Dataset.random`), so a run is reproducible even with a parallel `map`. The
Keras preprocessing layers (RandomFlip, RandomZoom, RandomTranslation, RandomErasing) draw from a
shared stateful SeedGenerator, whose draws land on elements in whatever order parallel map threads
run: same maths, no reproducibility. Hence tf.image / stateless ops here.
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

_FILL_MODES = ("nearest", "reflect", "constant", "wrap")
# Zhong et al., "Random Erasing Data Augmentation": up to N attempts to find a box that fits.
# Ten vectorised attempts; with the default area/aspect ranges on 2:1 person crops fewer than
# 1 in 10^4 draws find no box (then nothing is erased).
_ERASING_ATTEMPTS = 10


def as_hw(value, name: str):
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (height, width) of positive ints, got {value!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be a pair (height, width) of positive ints, got {value!r}")
    return h, w


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What to do to each training image (all off by default).

    Attributes:
        flip: random horizontal mirror with probability 0.5.
        zoom: scale the content by a factor drawn in [1 - zoom, 1 + zoom] about the centre.
        width_shift / height_shift: shift by a fraction of the width / height drawn in [-s, s].
        crop: `(h, w)`: resize the image to this size, then take a random `image_size` crop
            (identification+verification paper: 256x256 -> 224x224). `None`: resize to image_size.
        pad: zero-pad each side by this many pixels, then random-crop back to image_size.
        erasing_prob: probability of random erasing (Zhong et al. 2017); `erasing_area` is the
            range of the erased fraction of the image, `erasing_aspect` the lower bound r1 of the
            box aspect ratio (drawn in [r1, 1/r1]); erased pixels get uniform random values.
        fill_mode: how zoom / shift fill pixels from outside the image ("nearest" is the default
            of Keras' ImageDataGenerator, which the EfficientNet siamese release used).
    """

    flip: bool = False
    zoom: float = 0.0
    width_shift: float = 0.0
    height_shift: float = 0.0
    crop: tuple | None = None
    pad: int = 0
    erasing_prob: float = 0.0
    erasing_area: tuple = (0.02, 0.4)
    erasing_aspect: float = 0.3
    fill_mode: str = "nearest"

    def __post_init__(self):
        for name in ("zoom", "width_shift", "height_shift"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1), got {value!r}")
        object.__setattr__(self, "crop", as_hw(self.crop, "AugmentConfig.crop"))
        if int(self.pad) < 0:
            raise ValueError(f"AugmentConfig.pad must be >= 0, got {self.pad!r}")
        if not 0.0 <= self.erasing_prob <= 1.0:
            raise ValueError(f"AugmentConfig.erasing_prob must be in [0, 1], got {self.erasing_prob!r}")
        lo, hi = (float(v) for v in self.erasing_area)
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"AugmentConfig.erasing_area must satisfy 0 < lo <= hi < 1, got {self.erasing_area!r}")
        object.__setattr__(self, "erasing_area", (lo, hi))
        if not 0.0 < self.erasing_aspect <= 1.0:
            raise ValueError(f"AugmentConfig.erasing_aspect must be in (0, 1], got {self.erasing_aspect!r}")
        if self.fill_mode not in _FILL_MODES:
            raise ValueError(f"AugmentConfig.fill_mode must be one of {_FILL_MODES}, got {self.fill_mode!r}")

    @classmethod
    def efficientnet_paper(cls) -> "AugmentConfig":
        """Horizontal flip, zoom and width shift (EfficientNet siamese paper §B).

        The paper names the operations but not their ranges; 0.1 is a mild ImageDataGenerator-style choice.
        """
        return cls(flip=True, zoom=0.1, width_shift=0.1)

    @classmethod
    def idver_paper(cls, crop=(256, 256)) -> "AugmentConfig":
        """Resize to 256x256, random 224x224 crop (use image_size=(224, 224)), mirror (idver paper)."""
        return cls(flip=True, crop=crop)

    @classmethod
    def strong(cls) -> "AugmentConfig":
        """Flip, 10-pixel pad + random crop, random erasing p=0.5: the common modern re-ID recipe."""
        return cls(flip=True, pad=10, erasing_prob=0.5)

    @property
    def is_identity(self) -> bool:
        return (not self.flip and self.zoom == 0 and self.width_shift == 0 and self.height_shift == 0
                and self.crop is None and self.pad == 0 and self.erasing_prob == 0)

    def decode_size(self, image_size) -> tuple:
        """The size to resize decoded images to before `augment_image` (the crop size, if any)."""
        image_size = as_hw(image_size, "image_size")
        if self.crop is None:
            return image_size
        if self.crop[0] < image_size[0] or self.crop[1] < image_size[1]:
            raise ValueError(f"AugmentConfig.crop {self.crop} is smaller than image_size {image_size}: "
                             "the random crop is taken from the resized image")
        return self.crop


def _affine(image, seed, config: AugmentConfig):
    height, width = image.shape[0], image.shape[1]
    u = tf.random.stateless_uniform([3], seed, minval=-1.0, maxval=1.0)
    scale = 1.0 + config.zoom * u[0]
    tx = config.width_shift * width * u[1]
    ty = config.height_shift * height * u[2]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    # The transform maps *output* pixels to input pixels: zooming in by `scale` reads from
    # (x - cx) / scale + cx, and shifting the content by tx reads from x - tx.
    inv = 1.0 / scale
    transform = tf.stack([inv, 0.0, cx - cx * inv - tx, 0.0, inv, cy - cy * inv - ty, 0.0, 0.0])
    return keras.ops.image.affine_transform(image, transform, interpolation="bilinear",
                                            fill_mode=config.fill_mode)


def _erase(image, seed, config: AugmentConfig):
    height, width = image.shape[0], image.shape[1]
    draw_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = tf.random.stateless_uniform([5, _ERASING_ATTEMPTS], draw_seed)
    lo, hi = config.erasing_area
    r1 = config.erasing_aspect
    area = (lo + (hi - lo) * u[0]) * float(height * width)
    aspect = r1 + (1.0 / r1 - r1) * u[1]
    box_h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    box_w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (box_h < height) & (box_w < width) & (box_h > 0) & (box_w > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    box_h, box_w = box_h[first], box_w[first]
    top = tf.minimum(tf.cast(u[2, first] * tf.cast(height - box_h + 1, tf.float32), tf.int32), height - box_h)
    left = tf.minimum(tf.cast(u[3, first] * tf.cast(width - box_w + 1, tf.float32), tf.int32), width - box_w)
    apply = fits[first] & (u[4, 0] < config.erasing_prob)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    box = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w) & apply
    noise = tf.random.stateless_uniform([height, width, 3], noise_seed, minval=0.0, maxval=255.0)
    return tf.where(box[:, :, None], noise, image)


def augment_image(image, seed, config: AugmentConfig, image_size):
    """Augment one float32 0..255 image of size `config.decode_size(image_size)` to `image_size`.

    Args:
        image: (h, w, 3) float32 tensor, values in [0, 255].
        seed: int32/int64 tensor of shape (2,): the element's stateless seed.
        config: the AugmentConfig.
        image_size: `(H, W)` of the output.
    Returns:
        (H, W, 3) float32 tensor with values in [0, 255].
    """
    height, width = as_hw(image_size, "image_size")
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    if config.crop is not None:
        image = tf.image.stateless_random_crop(image, [height, width, 3], seeds[0])
    if config.pad:
        p = int(config.pad)
        image = tf.pad(image, [[p, p], [p, p], [0, 0]])
        image = tf.image.stateless_random_crop(image, [height, width, 3], seeds[1])
    image = tf.ensure_shape(image, [height, width, 3])
    if config.zoom or config.width_shift or config.height_shift:
        image = _affine(image, seeds[2], config)
    if config.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[3])
    if config.erasing_prob > 0:
        image = _erase(image, seeds[4], config)
    return tf.ensure_shape(image, [height, width, 3])

