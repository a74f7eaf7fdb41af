"""Identity warm-up: pre-train a randomly initialised embedding as a classifier of the training ids.

efficientnet_siamese_cuhk01.txt §II.B starts the siamese network from ImageNet weights. Where those
cannot be had (offline machines, `--weights none`), a verification loss alone barely moves a deep
backbone from random initialisation: one bit per pair, and the square layer's gradient
2 w (f1 - f2) is small while random features of the same and of different people are equally far
apart. Identification gives the backbone a dense signal (identification_verification_embedding.txt
§I: identification "makes full use of the re-ID labels"), so the default recipe spends its first
steps training `embedding -> Dropout -> Dense(num_ids)` on P x K batches of the training ids, drops
the classifier, and then trains the siamese network as the paper does.

The recipe key `id_warmup_steps` (CLI `--id-warmup-steps`) sets the number of steps; it runs only
when the backbone did not receive pretrained weights, and only at the start of a run (a resumed
run restores the warmed-up weights from its backup instead). The warm-up snapshots itself as the
recipe's `checkpoint_every_*` say (`training/snapshot.py`): a kill during it resumes at the last
snapshot's step with the data, seeds and optimizer state of the uninterrupted warm-up.
"""
from __future__ import annotations

import time

import keras
from keras import layers

# P identities x K images per batch: 64 images, the size of a default siamese batch (32 pairs).
WARMUP_P, WARMUP_K = 16, 4


def needs_warmup(steps: int, weights_info: dict) -> int:
    """Steps of identity warm-up this run should do: `steps`, or 0 when the backbone is pretrained."""
    steps = int(steps or 0)
    if steps < 0:
        raise ValueError(f"id_warmup_steps must be >= 0, got {steps}")
    return steps if weights_info.get("used") == "none" else 0


def build_identity_classifier(embedding: keras.Model, num_ids: int, dropout: float = 0.2) -> keras.Model:
    """`embedding` (shared, not copied) followed by Dropout and a softmax over `num_ids` identities."""
    if num_ids < 2:
        raise ValueError(f"identity warm-up needs at least 2 training identities, got {num_ids}")
    image = keras.Input(embedding.input.shape[1:], name="image")
    x = layers.Dropout(dropout, name="warmup_dropout")(embedding(image))
    probs = layers.Dense(num_ids, activation="softmax", name="warmup_identity")(x)
    return keras.Model(image, probs, name="identity_warmup")


def identity_warmup(model: keras.Model, records, num_ids: int, recipe, seed: int, steps: int, strategy,
                    verbose="auto", checkpoints=None) -> dict:
    """Train `model`'s "embedding" sub-model for `steps` P x K steps as an identity classifier.

    The classifier shares the embedding's variables, so the siamese model is warmed up in place.
    `recipe` supplies the image size, preprocessing, augmentation, dropout, `id_warmup_lr` and
    `jit_compile`. With `checkpoints` (a `snapshot.PhaseCheckpoints`) the warm-up continues from the
    snapshot found there and writes new ones as it goes. Returns a summary for config.json: steps,
    the step it resumed at, seconds (of this part), and the last batch's loss and accuracy.

    Raises:
        ValueError: the loss became non-finite or exploded (naming `id_warmup_lr`).
    """
    import os

    from reid_keras.data.pipelines import pk_dataset
    from reid_keras.training.callbacks import DivergenceGuard, WarmupBackup
    from reid_keras.training.optimizers import make_optimizer
    from reid_keras.training.snapshot import load_snapshot

    embedding = model.get_layer("embedding")
    with strategy.scope():
        classifier = build_identity_classifier(embedding, num_ids, dropout=recipe.dropout)
        classifier.compile(make_optimizer("adam", recipe.id_warmup_lr), loss="sparse_categorical_crossentropy",
                           metrics=["accuracy"], jit_compile=recipe.jit_compile)
        done, snapshot = 0, None
        if checkpoints is not None and os.path.exists(checkpoints.path):
            snapshot = load_snapshot(classifier, checkpoints.path)
            done = int(snapshot.position.get("step", 0)) if snapshot.position.get("steps") == steps else 0
    P = min(WARMUP_P, num_ids)  # small datasets: every identity in each batch
    print(f"identity warm-up: {steps} steps of {P} ids x {WARMUP_K} images over {num_ids} training ids "
          "(backbone has no pretrained weights)" + (f"; resuming after step {done}" if done else ""), flush=True)
    started, last = time.time(), {}
    guard = DivergenceGuard(cause=f"id_warmup_lr={recipe.id_warmup_lr:g}")
    callbacks = [guard] + ([WarmupBackup(checkpoints, steps, done, guard, snapshot)] if checkpoints else [])
    if done < steps:
        data = pk_dataset(records, P, WARMUP_K, recipe.image_size, preprocess=recipe.preprocessing,
                          augment=recipe.augment_config(), seed=seed + 7919, batches_per_epoch=steps,
                          initial_step=done)
        history = classifier.fit(data, epochs=1, steps_per_epoch=steps - done, verbose=verbose, shuffle=False,
                                 callbacks=callbacks)
        last = {k: float(v[-1]) for k, v in history.history.items()}
    if guard.tripped:
        raise ValueError(guard.message("the identity warm-up"))
    return {"steps": steps, "resumed_at_step": done, "P": P, "K": WARMUP_K,
            "seconds": round(time.time() - started, 1), "final_loss": last.get("loss"),
            "final_accuracy": last.get("accuracy")}
