"""Region proposal network of the person-search detector (OIM paper §3.1, after Faster R-CNN).

`RPNHead` turns the stem features into one objectness logit and one box delta per anchor:
a 512 x 3 x 3 convolution + ReLU "to transform the features specifically for pedestrians", then
two 1 x 1 convolutions (A logits, 4A deltas) (§3.1). Its outputs are flattened in the anchor order
of `boxes.generate_anchors`: anchor a of location (y, x) is row (y * Wf + x) * A + a.

`generate_proposals` (and the `ProposalLayer` wrapping it) turns them into proposals, per image,
in the order of py-faster-rcnn's proposal layer, which the paper builds on (§5.1):

    decode the deltas on the anchors (RPN weights 1, width / height growth clamped)
    clip to the image's own size (`image_shape`, before the batch's zero padding)
    drop boxes narrower or lower than `min_size` (and boxes with no area left, e.g. anchors over
        the padding, or non-finite values): their score becomes -inf and they are never selected
    keep the `pre_nms_top_n` best scores, greedy NMS at `nms_iou`, keep the `post_nms_top_n` best

Shapes are static: every image gets `post_nms_top_n` rows, the valid ones first (best score first),
then padding marked `valid = False`. Proposals carry no gradient (Faster R-CNN does not
backpropagate through them; the RPN learns from its own losses). NMS is TensorFlow's greedy
kernel (`tf.raw_ops.NonMaxSuppressionV4`, one image at a time): a box is suppressed when its IoU
with a kept, better-scored box is > `nms_iou` (torchvision's rule; `tf.image.non_max_suppression_padded`
suppresses at IoU >= threshold instead) and equal scores keep the lower anchor index first.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from reid_keras.models.person_search.boxes import RPN_BOX_WEIGHTS, clip_boxes, decode_boxes

# Proposal counts (issue 14, from py-faster-rcnn's RPN defaults, which the paper uses, §5.1, and
# SeqNet's MODEL.RPN.*): top-n by objectness before NMS, then after NMS.
PRE_NMS_TOP_N_TRAIN = 12000
POST_NMS_TOP_N_TRAIN = 2000
PRE_NMS_TOP_N_TEST = 6000
POST_NMS_TOP_N_TEST = 300
# "We will keep the top 128 adjusted bounding boxes after non-maximum suppression as our final
# proposals" (OIM paper §3.1): the paper's test-time count, fewer than SeqNet's 300.
PAPER_POST_NMS_TOP_N_TEST = 128
NMS_IOU = 0.7  # py-faster-rcnn RPN_NMS_THRESH, SeqNet MODEL.RPN.NMS_THRESH
# Smallest proposal side kept, in pixels of the resized image. torchvision / SeqNet drop only
# degenerate boxes (1e-3); py-faster-rcnn dropped sides under 16 original pixels, which would
# remove the narrow proposals of small, distant pedestrians (a 40-px person is ~15 px wide).
MIN_PROPOSAL_SIZE = 1e-3
RPN_CHANNELS = 512  # "a 512 x 3 x 3 convolutional layer" (OIM paper §3.1)


def _rpn_initializer():
    # N(0, 0.01²) weights, zero biases: py-faster-rcnn's and torchvision's RPN initialisation.
    return keras.initializers.RandomNormal(stddev=0.01)


@keras.saving.register_keras_serializable(package="reid_keras")
class RPNHead(keras.layers.Layer):
    """RPN head: 3x3 conv + ReLU, then per-anchor objectness logits and box deltas (OIM §3.1).

    Args:
        num_anchors: A, anchors per feature-map location (len(sizes) * len(ratios); 9 in the paper).
        channels: filters of the 3x3 convolution (512 in the paper).
        kernel_initializer: initializer of the three convolutions' kernels (biases start at 0).
            Default N(0, 0.01²) as in py-faster-rcnn / torchvision.

    Call args:
        features: [B, Hf, Wf, C] stem features (Hf, Wf may be unknown until run time).

    Returns:
        `(objectness, deltas)`: float32 logits [B, Hf*Wf*A] (sigmoid = P(person), the binary form
        of the paper's two-way softmax) and float32 deltas [B, Hf*Wf*A, 4] (dx, dy, dw, dh) in
        `boxes.generate_anchors` order. They are float32 also under mixed precision, because the
        proposals and the losses are computed from them in float32.

    Example:
        >>> objectness, deltas = RPNHead(num_anchors=9)(stem_features)
    """

    def __init__(self, num_anchors, channels=RPN_CHANNELS, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("num_anchors", num_anchors), ("channels", channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RPNHead: {name} must be an integer >= 1, got {value!r}")
        self.num_anchors = num_anchors
        self.channels = channels
        self.kernel_initializer = keras.initializers.get(kernel_initializer or _rpn_initializer())
        conv = dict(kernel_initializer=self.kernel_initializer, bias_initializer="zeros", dtype=self.dtype_policy)
        self.conv = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name="conv", **conv)
        self.objectness_conv = keras.layers.Conv2D(num_anchors, 1, name="objectness", **conv)
        self.deltas_conv = keras.layers.Conv2D(4 * num_anchors, 1, name="deltas", **conv)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(f"{self.name}: RPNHead expects features [batch, height, width, channels] with a "
                             f"known number of channels, got shape {input_shape}")
        self.conv.build(input_shape)
        hidden = input_shape[:3] + (self.channels,)
        self.objectness_conv.build(hidden)
        self.deltas_conv.build(hidden)
        super().build(input_shape)

    def call(self, features):
        hidden = self.conv(features)
        logits = ops.cast(self.objectness_conv(hidden), "float32")  # [B, Hf, Wf, A]
        deltas = ops.cast(self.deltas_conv(hidden), "float32")  # [B, Hf, Wf, A*4], channel a*4 + k
        batch = ops.shape(features)[0]
        return ops.reshape(logits, (batch, -1)), ops.reshape(deltas, (batch, -1, 4))

    def compute_output_shape(self, input_shape):
        batch, height, width = tuple(input_shape)[:3]
        count = height * width * self.num_anchors if height is not None and width is not None else None
        return (batch, count), (batch, count, 4)

    def get_config(self):
        config = super().get_config()
        config.update(num_anchors=self.num_anchors, channels=self.channels,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config


def _check_counts(pre_nms_top_n, post_nms_top_n, nms_iou, min_size):
    for name, value in (("pre_nms_top_n", pre_nms_top_n), ("post_nms_top_n", post_nms_top_n)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(nms_iou, (int, float)) or isinstance(nms_iou, bool) or not 0.0 < nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be a number in (0, 1], got {nms_iou!r}")
    if (not isinstance(min_size, (int, float)) or isinstance(min_size, bool) or not math.isfinite(min_size)
            or min_size < 0):
        raise ValueError(f"min_size must be a finite number >= 0 (pixels), got {min_size!r}")


def _check_shapes(objectness, deltas, anchors, image_shape):
    if len(objectness.shape) != 2:
        raise ValueError(f"objectness must have shape [batch, num_anchors], got {tuple(objectness.shape)}")
    if len(deltas.shape) != 3 or deltas.shape[-1] != 4:
        raise ValueError(f"deltas must have shape [batch, num_anchors, 4], got {tuple(deltas.shape)}")
    if len(anchors.shape) != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must have shape [num_anchors, 4] (x1, y1, x2, y2), got {tuple(anchors.shape)}")
    if len(image_shape.shape) != 2 or image_shape.shape[-1] != 2:
        raise ValueError(f"image_shape must have shape [batch, 2] (height, width of each image before padding), "
                         f"got {tuple(image_shape.shape)}")
    counts = {"objectness": objectness.shape[1], "deltas": deltas.shape[1], "anchors": anchors.shape[0]}
    known = {k: v for k, v in counts.items() if v is not None}
    if len(set(known.values())) > 1:
        raise ValueError(f"objectness, deltas and anchors must hold the same number of anchors, got {known}")


def generate_proposals(objectness, deltas, anchors, image_shape, pre_nms_top_n, post_nms_top_n,
                       nms_iou=NMS_IOU, min_size=MIN_PROPOSAL_SIZE):
    """Proposals of every image of a batch: decode, clip, drop tiny, top-n, NMS, top-n (module docstring).

    Args:
        objectness: [B, N] logits of `RPNHead` (N = Hf * Wf * A); ranking uses the logits, so
            scores that saturate the sigmoid still rank in order.
        deltas: [B, N, 4] RPN deltas (dx, dy, dw, dh) of `RPNHead`.
        anchors: [N, 4] `boxes.generate_anchors` for the feature map.
        image_shape: [B, 2] int or float, height and width of each image before padding (the
            scene pipeline's `image_shape`); proposals are clipped to it.
        pre_nms_top_n: boxes kept by objectness before NMS (`PRE_NMS_TOP_N_TRAIN` / `_TEST`).
        post_nms_top_n: boxes kept after NMS; the static number of rows of the outputs.
        nms_iou: a box is suppressed by a better one when their IoU is > nms_iou.
        min_size: boxes with width or height < min_size pixels (after clipping) are dropped.

    Returns:
        `(proposals, scores, valid)`: float32 [B, post_nms_top_n, 4] boxes (x1, y1, x2, y2) in
        image pixels, float32 [B, post_nms_top_n] sigmoid(objectness), bool [B, post_nms_top_n].
        Per image the valid rows come first, by decreasing score; padding rows are zeros and
        invalid (an image has fewer proposals when fewer boxes survive NMS). No gradient flows
        back through any output.
    """
    _check_counts(pre_nms_top_n, post_nms_top_n, nms_iou, min_size)
    # Stopped here: Faster R-CNN does not backpropagate through the proposals.
    objectness = tf.stop_gradient(tf.cast(objectness, tf.float32))
    deltas = tf.stop_gradient(tf.cast(deltas, tf.float32))
    anchors = tf.stop_gradient(tf.cast(anchors, tf.float32))
    image_shape = tf.convert_to_tensor(image_shape)
    _check_shapes(objectness, deltas, anchors, image_shape)

    boxes = clip_boxes(decode_boxes(anchors, deltas, RPN_BOX_WEIGHTS), image_shape)  # [B, N, 4]
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    keep = ((widths >= min_size) & (heights >= min_size) & (widths > 0) & (heights > 0)
            & tf.math.is_finite(objectness) & tf.reduce_all(tf.math.is_finite(boxes), axis=-1))
    ranked = tf.where(keep, objectness, tf.constant(-math.inf, tf.float32))

    # top_k keeps the lower index first among equal scores, and the NMS kernel does the same.
    candidates = tf.minimum(pre_nms_top_n, tf.shape(ranked)[1])
    top_scores, top_index = tf.math.top_k(ranked, k=candidates, sorted=True)  # [B, K]
    top_boxes = tf.gather(boxes, top_index, batch_dims=1)  # [B, K, 4]

    def suppress(image):
        # tf.image has no batched NMS with torchvision's "IoU > threshold" rule; one image at a time
        # through the greedy kernel (a loop over the batch, not over boxes). Score -inf (dropped)
        # is not > score_threshold = -inf, so dropped boxes are never selected.
        image_boxes, image_scores = image
        selected = tf.raw_ops.NonMaxSuppressionV4(
            boxes=image_boxes, scores=image_scores, max_output_size=post_nms_top_n,
            iou_threshold=float(nms_iou), score_threshold=-math.inf, pad_to_max_output_size=True)
        return selected.selected_indices, selected.valid_outputs

    selected, num_valid = tf.map_fn(
        suppress, (top_boxes, top_scores),
        fn_output_signature=(tf.TensorSpec([post_nms_top_n], tf.int32), tf.TensorSpec([], tf.int32)))
    valid = tf.range(post_nms_top_n)[None, :] < num_valid[:, None]  # [B, post]
    proposals = tf.where(valid[..., None], tf.gather(top_boxes, selected, batch_dims=1), 0.0)
    scores = tf.where(valid, tf.sigmoid(tf.gather(top_scores, selected, batch_dims=1)), 0.0)
    return proposals, scores, valid


@keras.saving.register_keras_serializable(package="reid_keras")
class ProposalLayer(keras.layers.Layer):
    """`generate_proposals` as a layer (no weights); one instance per setting (training / test).

    Args:
        pre_nms_top_n, post_nms_top_n, nms_iou, min_size: as in `generate_proposals`; the paper's
            values are `PRE_NMS_TOP_N_TRAIN` / `POST_NMS_TOP_N_TRAIN` (12,000 / 2,000) while
            training and `PRE_NMS_TOP_N_TEST` / `POST_NMS_TOP_N_TEST` (6,000 / 300) at test.

    Call args:
        inputs: `[objectness [B, N], deltas [B, N, 4], anchors [N, 4], image_shape [B, 2]]`.

    Returns:
        `(proposals [B, post, 4], scores [B, post], valid [B, post] bool)`, no gradient.

    Example:
        >>> proposals, scores, valid = ProposalLayer(6000, 300)([objectness, deltas, anchors, image_shape])
    """

    def __init__(self, pre_nms_top_n, post_nms_top_n, nms_iou=NMS_IOU, min_size=MIN_PROPOSAL_SIZE, **kwargs):
        # Under a mixed policy Keras would cast the logits and deltas to float16 before `call`;
        # the proposals are computed in float32.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        _check_counts(pre_nms_top_n, post_nms_top_n, nms_iou, min_size)
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_iou = float(nms_iou)
        self.min_size = float(min_size)
        self.supports_jit = False  # the NMS kernel has no XLA lowering

    def _split(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 4:
            count = len(inputs) if isinstance(inputs, (list, tuple)) else 1
            raise ValueError(f"{self.name}: ProposalLayer expects inputs [objectness, deltas, anchors, image_shape], "
                             f"got {count} input(s)")
        return inputs

    def call(self, inputs):
        objectness, deltas, anchors, image_shape = self._split(inputs)
        return generate_proposals(objectness, deltas, anchors, image_shape, self.pre_nms_top_n,
                                  self.post_nms_top_n, self.nms_iou, self.min_size)

    def compute_output_shape(self, input_shape):
        batch = tuple(self._split(input_shape)[0])[0]
        return (batch, self.post_nms_top_n, 4), (batch, self.post_nms_top_n), (batch, self.post_nms_top_n)

    def compute_output_spec(self, inputs):
        batch = self._split(inputs)[0].shape[0]
        post = self.post_nms_top_n
        return (keras.KerasTensor((batch, post, 4), "float32"), keras.KerasTensor((batch, post), "float32"),
                keras.KerasTensor((batch, post), "bool"))

    def get_config(self):
        config = super().get_config()
        config.update(pre_nms_top_n=self.pre_nms_top_n, post_nms_top_n=self.post_nms_top_n,
                      nms_iou=self.nms_iou, min_size=self.min_size)
        return config
