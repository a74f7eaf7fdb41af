"""The training CLI end to end on a tiny synthetic set: run folder, resume after a crash, errors,
and the 2-replica MirroredStrategy step."""
import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.cli import train

TINY = ["--model", "siamese_b0", "--weights", "none", "--steps-per-epoch", "2", "--batch-size", "4",
        "--image-size", "64x32", "--synthetic-ids", "12", "--seed", "3"]


class Crash(Exception):
    pass


class CrashInEpoch(keras.callbacks.Callback):
    """Simulates a kill: raises after the first batch of `epoch` (0-based)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.current = epoch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch:
            raise Crash(f"killed in epoch {self.epoch + 1}")


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_and_finishes(tmp_path, capsys):
    args = TINY + ["--epochs", "3", "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "runs"),
                   "--name", "r", "--id-warmup-steps", "2"]
    with pytest.raises(Crash):
        train.run(args, extra_callbacks=[CrashInEpoch(epoch=2)])
    assert "identity warm-up: 2 steps" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "r"
    state = json.loads((run_dir / "state.json").read_text())
    assert state == {"completed_epochs": 2, "batch": 0}
    assert (run_dir / "last.keras").is_file() and not (run_dir / "metrics.json").exists()
    assert not [p for p in os.listdir(run_dir) if ".tmp" in p], "a temporary file was left behind"

    # Same arguments + --resume: continues at epoch 3 (weights from the backup, no second warm-up)
    # and finishes the whole run.
    assert train.main(args + ["--resume"]) == 0
    assert "identity warm-up" not in capsys.readouterr().out
    with open(run_dir / "history.csv") as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    assert epochs == [0, 1, 2]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "siamese_b0" and config["image_size"] == [64, 32]
    assert config["runtime_weights"]["used"] == "none"
    assert config["runtime_id_warmup"]["steps"] == 2 and config["runtime_id_warmup"]["final_loss"] > 0
    assert config["runtime_dataset"]["train"]["ids"] == 6

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for ranking in ("embedding_cosine", "verification_head"):
        assert 0.0 <= metrics[ranking]["rank1"] <= 1.0 and 0.0 <= metrics[ranking]["mAP"] <= 1.0
        assert metrics[ranking]["num_valid_queries"] > 0
    for plot in ("cmc.png", "ranked_lists.png", "camera_heatmap.png", "distance_histograms.png", "tsne.png"):
        path = run_dir / "evaluation" / plot
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    export = run_dir / "export"
    assert (export / "saved_model.pb").is_file()
    served = tf.saved_model.load(str(export))
    out = served.embed(tf.constant(np.full((1, 90, 40, 3), 120, np.uint8)))
    out = out["embedding"] if isinstance(out, dict) else out
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1), 1.0, atol=1e-5)

    # A resume with a different model configuration is refused, naming the key.
    assert train.main(args + ["--resume", "--lr", "0.5"]) == 2


def test_bad_flags_give_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--model", "siamese_b9"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'siamese_b9'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        train.main(["--model", "siamese_b0", "--image-size", "160by80"])
    assert "--image-size must look like 160x80" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--model", "siamese_b0", "--image-size", "16x8"])
    assert "both sides must be >= 32" in capsys.readouterr().err

    missing = tmp_path / "nowhere"
    code = train.main(["--model", "siamese_b0", "--dataset", "market1501", "--data-root", str(missing),
                       "--output", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err

    code = train.main(["--model", "siamese_b0", "--dataset", "cuhk01", "--output", str(tmp_path / "runs")])
    assert code == 2 and "--data-root is required" in capsys.readouterr().err


def _all_layers(layer):
    for sub in getattr(layer, "layers", []):
        yield sub
        yield from _all_layers(sub)


@pytest.mark.slow
def test_two_replica_mirrored_first_step_loss_equals_one_device():
    from reid_keras.models.siamese import build_siamese, compile_siamese
    from reid_keras.training.distribute import choose_strategy, synchronize_batch_norm
    from reid_keras.training.optimizers import make_optimizer

    rng = np.random.default_rng(0)
    images_a = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    images_b = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    same = np.array([1, 0, 1, 0, 0, 1, 1, 0], np.int32)

    def first_step_loss(devices):
        strategy = choose_strategy(devices)
        keras.utils.set_random_seed(7)
        with strategy.scope():
            model = build_siamese("efficientnetb0", (32, 32), weights=None, dropout=0.0)
            assert synchronize_batch_norm(model) == 49  # every BN of EfficientNet-B0
            # Stochastic depth draws differ per replica; switch it off so the step is deterministic.
            for layer in _all_layers(model):
                if isinstance(layer, keras.layers.Dropout):
                    layer.rate = 0.0
            compile_siamese(model, make_optimizer("rmsprop", 1e-4), jit_compile=False)
        data = tf.data.Dataset.from_tensor_slices(((images_a, images_b), same)).batch(8)
        history = model.fit(data, epochs=1, verbose=0, shuffle=False)
        return strategy.num_replicas_in_sync, history.history["loss"][0]

    replicas_one, loss_one = first_step_loss(["/cpu:0"])
    replicas_two, loss_two = first_step_loss(["/cpu:0", "/cpu:1"])
    assert (replicas_one, replicas_two) == (1, 2)
    # float32 sums over 49 synchronised BN layers in another order differ by ~2e-5 relative; unsynchronised
    # BN or a wrong loss scaling differ by > 10 %.
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-4)


def test_identity_warmup_trains_the_shared_embedding_only_without_pretrained_weights():
    from reid_keras.training.warmup import build_identity_classifier, needs_warmup

    assert needs_warmup(5, {"used": "none"}) == 5
    assert needs_warmup(5, {"used": "imagenet"}) == 0
    assert needs_warmup(0, {"used": "none"}) == 0
    with pytest.raises(ValueError, match="id_warmup_steps must be >= 0"):
        needs_warmup(-1, {"used": "none"})

    image = keras.Input((8, 4, 3))
    embedding = keras.Model(image, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(5, 3)(image)),
                            name="embedding")
    classifier = build_identity_classifier(embedding, num_ids=3)
    assert classifier.output.shape == (None, 3)
    # The classifier holds the embedding's own variables, so training it warms up the siamese model.
    kernel = embedding.layers[1].kernel
    assert any(v is kernel for v in classifier.trainable_variables)
    with pytest.raises(ValueError, match="at least 2 training identities"):
        build_identity_classifier(embedding, num_ids=1)


@pytest.mark.slow
def test_zero_epochs_evaluates_the_model_as_built(tmp_path):
    code = train.main(["--model", "siamese_b0", "--epochs", "0", "--id-warmup-steps", "0", "--weights", "none",
                       "--image-size", "64x32", "--synthetic-ids", "12", "--data-root", str(tmp_path / "data"),
                       "--output", str(tmp_path / "runs"), "--name", "untrained", "--no-export", "--no-plots"])
    assert code == 0
    run = tmp_path / "runs" / "untrained"
    assert (run / "last.keras").is_file() and not (run / "history.csv").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["embedding_cosine"]["model"] == str(run / "last.keras")
    assert 0.0 <= metrics["embedding_cosine"]["mAP"] <= 1.0 and metrics["embedding_cosine"]["num_query"] > 0
    assert "runtime_train_seconds" not in json.loads((run / "config.json").read_text())
