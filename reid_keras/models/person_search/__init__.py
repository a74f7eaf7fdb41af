"""Joint detection + identification network for person search (oim_person_search.txt §3, §5.1).

One concept per module (import them directly; this package imports nothing):

- `boxes`      anchors, box coding (encode / decode with a clamped width/height), clipping, IoU.
- `sampling`   training targets: RPN anchor labels + deltas, RoI labels / identities / deltas.
- `rpn`        the RPN head and the proposal layer (decode, clip, drop tiny, top-n, NMS).
- `roi_align`  RoI align on the stem features (tf.image.crop_and_resize at bin centres + pooling).
- `losses`     detection losses: RPN objectness / smooth-L1, box classification / regression.
- `backbone`   ResNet-50 stem (conv1..conv4_x, frozen BN) and conv5_x identification net.
- `heads`      box predictor (person / background + class-agnostic deltas) and the 256-d embedding.
- `model`      `PersonSearchConfig` and `PersonSearchModel`: the whole network, its training step
               (in-graph sampling, five losses, OIM memory) and inference (`detect`, `embed_query`).
- `detector_outputs`  test-time post-processing: refined boxes, per-image NMS, top-k, embeddings.
- `export`     the SavedModel with `detect` and `embed_query` endpoints (preprocessing in the graph).

Boxes are always `x1, y1, x2, y2` float32 in the pixels of the (resized, padded) input image.
"""
