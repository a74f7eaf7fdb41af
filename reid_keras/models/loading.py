"""Load a trained model: the one path every command reads a `.keras` file or an exported SavedModel through.

- `inspect_model_path(path)`: "keras" or "saved_model", or a `ModelLoadError` naming the path and what
  is wrong with it (missing, empty, truncated, corrupted, a run folder, an HDF5 weights file, an image,
  ...) before Keras or TensorFlow see it: Keras says "File not found" for any file it cannot open, and
  TensorFlow raises OpError / IndexError / FileNotFoundError for a damaged SavedModel.
- `load_keras_model(path)`: `keras.saving.load_model(safe_mode=True)` after those checks, its own
  failures (weights of another architecture, unregistered layers) translated. The caller registers
  the layers the file names first (`reid_keras.families.register_serializables()`, which the
  commands call).
- `load_saved_model(path)`: `tf.saved_model.load` after those checks, likewise translated.
- Both refuse a model whose weights hold NaN or inf (`NonFiniteModelError`: a diverged training run).
- `load_embedding_model(path)`: either, as an `EmbeddingModel` whose `embed(images)` takes a batch of
  raw pixels (uint8 or float 0..255, NHWC) and returns one feature row per image, refusing NaN / inf
  features. A `.keras` model's sub-model or layer named `embedding` (the shared branch of a siamese /
  id-verification model) is used when present, else the model itself when it has one image input; a
  SavedModel must expose an `embed` function or signature on raw uint8 images (`reid_keras.export`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Callable, Iterable, Optional

import numpy as np

from reid_keras.data.preprocessing import preprocess, preprocessing_mode

# The members of a Keras 3 `.keras` zip archive that loading needs (metadata.json is optional).
KERAS_CONFIG = "config.json"
KERAS_WEIGHTS = ("model.weights.h5", "model.weights.npz")
# What a training run folder holds that can be loaded (reid_keras.training.run_folder).
RUN_FOLDER_MODELS = ("last.keras", "best.keras", "export")
_SHARD = re.compile(r"^variables\.data-(\d{5})-of-(\d{5})$")
_MAGIC = ((b"\x89HDF\r\n\x1a\n", "an HDF5 file"), (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"),
          (b"GIF8", "a GIF image"), (b"\x1f\x8b", "a gzip archive (unpack it first)"), (b"%PDF", "a PDF document"),
          (b"\x93NUMPY", "a numpy .npy array"))


class ModelLoadError(ValueError):
    """The model path does not exist or does not hold a usable model; the message names the path and why."""


class NonFiniteModelError(ModelLoadError):
    """The model holds NaN / inf weights, or produced NaN / inf outputs: a diverged training run."""


# ---------------------------------------------------------------------------------------------------
# What is at the path


def inspect_model_path(path: str) -> str:
    """"keras" (a `.keras` archive) or "saved_model" (a SavedModel folder) when `path` looks complete.

    Checks the files only (cheap; no Keras / TensorFlow): presence, sizes, zip structure and CRCs,
    the archive's members, the SavedModel's graph, index and weight shards.

    Raises:
        ModelLoadError: naming `path` and what is wrong, with what to pass instead where it can tell.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path!r} does not exist: expected a .keras file or an exported "
                             "SavedModel folder")
    if os.path.isdir(path):
        _check_saved_model_folder(path)
        return "saved_model"
    _check_keras_file(path)
    return "keras"


def _listing(names, limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_saved_model_folder(path: str) -> None:
    entries = sorted(os.listdir(path))
    if not entries:
        raise ModelLoadError(f"could not load {path!r}: an empty folder (expected a .keras file or an exported "
                             "SavedModel folder with saved_model.pb and variables/)")
    if "saved_model.pb" not in entries:
        if KERAS_CONFIG in entries or any(name in entries for name in RUN_FOLDER_MODELS):
            raise ModelLoadError(_run_folder_message(path, entries))
        if "variables" in entries or "fingerprint.pb" in entries:
            raise ModelLoadError(f"could not load SavedModel {path!r}: saved_model.pb (the graph) is missing "
                                 "(deleted, or an incomplete copy): export the model again")
        keras_files = [os.path.join(path, name) for name in entries if name.endswith(".keras")]
        hint = f"; pass one of its .keras files, e.g. {keras_files[0]!r}" if keras_files else ""
        raise ModelLoadError(f"could not load {path!r}: a folder without saved_model.pb, so not a reid_keras "
                             f"export (nor any SavedModel); it holds {_listing(entries)}{hint}")
    graph = os.path.join(path, "saved_model.pb")
    if os.path.getsize(graph) == 0:
        raise ModelLoadError(f"could not load SavedModel {path!r}: saved_model.pb is empty (0 bytes)")
    variables = os.path.join(path, "variables")
    if not os.path.isdir(variables):
        raise ModelLoadError(f"could not load SavedModel {path!r}: the variables/ folder (the weights) is missing "
                             "(an incomplete copy?): export the model again")
    names = sorted(os.listdir(variables))
    if "variables.index" not in names:
        raise ModelLoadError(f"could not load SavedModel {path!r}: variables/variables.index is missing (the "
                             "index of the weights; an incomplete copy?): export the model again")
    if os.path.getsize(os.path.join(variables, "variables.index")) == 0:
        raise ModelLoadError(f"could not load SavedModel {path!r}: variables/variables.index is empty (0 bytes)")
    shards = [m for m in map(_SHARD.match, names) if m]
    if not shards:
        raise ModelLoadError(f"could not load SavedModel {path!r}: no weight data in variables/ (variables.data-"
                             "00000-of-NNNNN is missing; an incomplete copy?): export the model again")
    total = int(shards[0].group(2))
    expected = [f"variables.data-{i:05d}-of-{total:05d}" for i in range(total)]
    missing = [name for name in expected if name not in names]
    if missing:
        raise ModelLoadError(f"could not load SavedModel {path!r}: weight shard(s) {_listing(missing)} missing from "
                             "variables/ (an incomplete copy?)")
    for name in expected:
        if os.path.getsize(os.path.join(variables, name)) == 0:
            raise ModelLoadError(f"could not load SavedModel {path!r}: variables/{name} is empty (0 bytes; "
                                 "truncated)")


def _run_folder_message(path: str, entries) -> str:
    found = [os.path.join(path, name) for name in RUN_FOLDER_MODELS if name in entries]
    if not found:
        return (f"could not load {path!r}: a training run folder without a model yet (no last.keras, best.keras "
                "or export/ in it): the run stopped before its first checkpoint")
    return (f"could not load {path!r}: a training run folder, not a model; pass one of its models: "
            f"{' or '.join(found)} (a .keras file, or export/ for the served SavedModel)")


def describe_file(path: str) -> str:
    """What the bytes of `path` look like ("a JPEG image", "a text file", ...), from its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "an empty file (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head.startswith(b"PK"):
        return "a zip archive"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "an unrecognised binary file"


def _check_keras_file(path: str) -> None:
    name = os.path.basename(path)
    if name == "saved_model.pb":
        raise ModelLoadError(f"could not load {path!r}: the graph file of a SavedModel; pass the folder holding it, "
                             f"{os.path.dirname(path) or '.'!r}")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(f"could not load {path!r}: an empty file (0 bytes; an interrupted save or copy?)")
    what = describe_file(path)
    if what == "an HDF5 file":
        raise ModelLoadError(_hdf5_message(path))
    if not zipfile.is_zipfile(path):
        if what == "a zip archive":
            raise ModelLoadError(f"could not load {path!r}: not a complete zip archive (it starts like one but its "
                                 f"end is missing, {size} bytes): a truncated .keras file (an interrupted save or "
                                 "copy?)")
        if name.endswith(".keras"):
            raise ModelLoadError(f"could not load {path!r}: not a zip archive (a .keras model is one); it is "
                                 f"{what} of {size} bytes: damaged, or not a Keras 3 model")
        raise ModelLoadError(f"could not load {path!r}: {what}, not a model (expected a .keras file or an exported "
                             "SavedModel folder)")
    _check_keras_archive(path)


def _read_keras_archive(path: str):
    """(member names, first member failing its CRC or None, config.json bytes or None) of a zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            bad = archive.testzip()  # reads every member: bit rot or a partial overwrite fails its CRC
            config = archive.read(KERAS_CONFIG) if KERAS_CONFIG in members and bad is None else None
    except Exception as err:  # BadZipFile, EOFError, OSError, zlib.error from a damaged member
        raise ModelLoadError(f"could not load {path!r}: the .keras archive is corrupted "
                             f"({type(err).__name__}: {err})") from None
    return members, bad, config


def _check_keras_archive(path: str) -> None:
    members, bad, config = _read_keras_archive(path)
    has_config = KERAS_CONFIG in members
    has_weights = any(name in members for name in KERAS_WEIGHTS)
    if not has_config and not has_weights:
        kind = ("a numpy .npz archive" if members and all(m.endswith(".npy") for m in members)
                else f"a zip archive holding {_listing(members) or 'nothing'}")
        raise ModelLoadError(f"could not load {path!r}: {kind}, not a Keras model (no {KERAS_CONFIG} or "
                             f"{KERAS_WEIGHTS[0]} in it)")
    if not has_config:
        raise ModelLoadError(f"could not load {path!r}: the .keras archive has no {KERAS_CONFIG} (the architecture) "
                             "inside: damaged, or not written by Keras 3")
    if not has_weights:
        raise ModelLoadError(f"could not load {path!r}: the .keras archive has no {KERAS_WEIGHTS[0]} (the weights) "
                             "inside: damaged, or saved without weights")
    if bad is not None:
        raise ModelLoadError(f"could not load {path!r}: the .keras archive is corrupted ({bad} fails its CRC check)")
    try:
        parsed = json.loads(config)
    except ValueError as err:
        raise ModelLoadError(f"could not load {path!r}: its {KERAS_CONFIG} is not valid JSON ({err})") from None
    if not isinstance(parsed, dict) or "class_name" not in parsed:
        raise ModelLoadError(f"could not load {path!r}: its {KERAS_CONFIG} does not describe a Keras model "
                             "(no class_name)")
    if not path.endswith(".keras"):
        raise ModelLoadError(f"could not load {path!r}: a Keras archive whose name does not end in .keras (Keras "
                             "picks the format from the extension): rename it")


def _hdf5_message(path: str) -> str:
    try:
        import h5py  # already a dependency (CUHK03 v7.3 .mat files); only reads two attributes here

        with h5py.File(path, "r") as handle:
            legacy_model = "model_config" in handle.attrs
    except Exception as err:  # a damaged HDF5 file raises OSError or several h5py errors
        return f"could not load {path!r}: a damaged HDF5 file ({type(err).__name__}: {err})"
    if legacy_model:
        return (f"could not load {path!r}: a legacy Keras 2 HDF5 model; reid_keras reads Keras 3 .keras files "
                "(load it in Keras and save it again as .keras)")
    return (f"could not load {path!r}: an HDF5 weights file (weights without the architecture), not a model; pass "
            "the .keras model they belong to (e.g. the run's last.keras)")


# ---------------------------------------------------------------------------------------------------
# Loading


def _first_line(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _keras_version() -> str:
    import keras

    return f"Keras {keras.__version__}"


def _keras_failure(path: str, err: Exception) -> str:
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "could not be loaded" in text or ("expected" in text and "variables" in text):
        layer = re.search(r"<\w+ name=([^,>]+)", text)
        shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", text)
        if shapes:
            detail = f"a variable of shape {shapes.group(1)} gets {shapes.group(2)} from the file"
        else:
            detail = lines[1] if len(lines) > 1 else lines[0] if lines else ""
        where = f"layer {layer.group(1)!r}: " if layer and not detail.startswith("Layer ") else ""
        return (f"could not load {path!r}: its weights ({KERAS_WEIGHTS[0]}) do not fit the architecture in its "
                f"{KERAS_CONFIG} (weights of another model?); {where}{detail}")
    unknown = re.search(r"Could not locate class '([^']+)'", text)
    if unknown:
        module = re.search(r"Full object config: \{'module': '([^']+)'", text)
        where = f" (module {module.group(1)})" if module else ""
        return (f"could not load {path!r}: it uses the class {unknown.group(1)!r}{where}, which is not registered: "
                "call reid_keras.families.register_serializables() first (the commands do), or the file needs a "
                "newer reid_keras")
    foreign = re.search(r"Could not deserialize '([^']+)' because it is not a KerasSaveable", text)
    if foreign:
        return (f"could not load {path!r}: its {KERAS_CONFIG} names {foreign.group(1)!r}, which this Keras "
                f"({_keras_version()}) does not have (written by another Keras version, or edited?)")
    if "safe_mode" in text or "Lambda" in text:
        return f"could not load {path!r}: {_first_line(err)} (reid_keras models contain no Lambda layers)"
    return f"could not load {path!r}: {type(err).__name__}: {_first_line(err)}"


def load_keras_model(path: str, compile: bool = False, check_finite: bool = True):
    """`keras.saving.load_model(path, safe_mode=True)` of a `.keras` file, every failure a `ModelLoadError`.

    Args:
        path: a `.keras` file (its reid_keras layers registered by the caller).
        compile: also restore the optimizer and losses (not needed to predict, evaluate or export).
        check_finite: refuse NaN / inf weights (`NonFiniteModelError`, naming the first such variable).
    """
    if inspect_model_path(path) != "keras":
        raise ModelLoadError(f"could not load {path!r} as a .keras model: it is an exported SavedModel folder (for "
                             "serving); pass the .keras file it was exported from")
    import warnings

    import keras

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = keras.saving.load_model(path, safe_mode=True, compile=compile)
        except Exception as err:  # Keras raises many types (ValueError, TypeError, KeyError, zip errors)
            failure = _keras_failure(path, err)  # its warnings ("Skipping nested container ...") only repeat it
        else:
            failure = None
    if failure:
        raise ModelLoadError(failure)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if check_finite:
        check_finite_weights(model.variables, path)
    return model


def _saved_model_failure(path: str, err: Exception) -> str:
    text = str(getattr(err, "message", "") or err)
    if "Read less bytes than requested" in text or "truncated" in text.lower():
        return (f"could not load SavedModel {path!r}: its weight data (variables/variables.data-...) is truncated "
                "(an interrupted copy?): export the model again")
    if "hecksum does not match" in text or "checksum" in text.lower():
        return (f"could not load SavedModel {path!r}: its weight data (variables/) is corrupted (a checksum does "
                "not match): export the model again")
    if "sstable" in text or "bad magic number" in text or "Corruption" in text:
        return f"could not load SavedModel {path!r}: variables/variables.index is corrupted ({_first_line(err)})"
    if "Cannot parse file" in text or "saved_model.pb" in text or "Wire format" in text:
        return (f"could not load SavedModel {path!r}: saved_model.pb is corrupted or truncated (not a SavedModel "
                "graph): export the model again")
    if "No such file" in text or "Failed to find" in text:
        return f"could not load SavedModel {path!r}: a file it needs is missing ({_first_line(err)})"
    return f"could not load SavedModel {path!r}: {type(err).__name__}: {_first_line(err)}"


def load_saved_model(path: str, check_finite: bool = True):
    """`tf.saved_model.load(path)` of a SavedModel folder, every failure a `ModelLoadError`.

    With `check_finite`, the weights a reid_keras export tracks (`model_variables`) must hold no NaN / inf.
    TensorFlow's "unsaved custom gradients" load warning (expected for our exports) is silenced.
    """
    if inspect_model_path(path) != "saved_model":
        raise ModelLoadError(f"could not load {path!r} as a SavedModel: it is a .keras file; export it first "
                             f"(python -m reid_keras.export --model {path} --out DIR)")
    import logging

    import tensorflow as tf  # SavedModel loading has no Keras 3 equivalent

    class _Quiet(logging.Filter):
        def filter(self, record):
            return "unsaved custom gradients" not in record.getMessage()

    quiet = _Quiet()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        loaded = tf.saved_model.load(path)
    except Exception as err:  # OpError, DataLossError, IndexError, OSError, FileNotFoundError, ...
        raise ModelLoadError(_saved_model_failure(path, err)) from None
    finally:
        absl_logger.removeFilter(quiet)
    if check_finite:
        check_finite_weights(getattr(loaded, "model_variables", ()), path)
    return loaded


# ---------------------------------------------------------------------------------------------------
# NaN / inf


def _variable_name(variable) -> str:
    return str(getattr(variable, "path", None) or getattr(variable, "name", "?")).removesuffix(":0")


def check_finite_weights(variables: Iterable, source: str) -> None:
    """Raise `NonFiniteModelError` naming `source` and the first variable holding NaN or inf.

    Args:
        variables: Keras or TensorFlow variables (non-float ones, e.g. seed states, are skipped).
        source: what to call the model in the message (its file, or its name).
    """
    bad = []
    for variable in variables:
        values = np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable)
        if not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all():
            continue
        bad.append((variable, int(np.isnan(values).sum()), int(np.isinf(values).sum()), values.size))
    if bad:
        variable, nans, infs, size = bad[0]
        more = f" ({len(bad) - 1} more variable(s) likewise)" if len(bad) > 1 else ""
        raise NonFiniteModelError(
            f"model {source!r} has non-finite weights: variable {_variable_name(variable)!r} holds {nans} NaN and "
            f"{infs} inf of its {size} values{more}. The training diverged (learning rate too high?): use an "
            "earlier checkpoint or retrain")


def check_finite_outputs(values, source: str, what: str = "features", unit: str = "image") -> None:
    """Raise `NonFiniteModelError` naming the model `source` when `values` (one row per `unit`) hold NaN or inf."""
    values = np.asarray(values)
    if np.isfinite(values).all():
        return
    rows = values.reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
    count = int((~np.isfinite(rows)).any(axis=1).sum())
    raise NonFiniteModelError(
        f"model {source!r} produced non-finite {what} (NaN or inf) for {count} of {len(rows)} {unit}(s): its "
        "weights overflow (a diverged training run?); the input is not the cause")


# ---------------------------------------------------------------------------------------------------
# Embedding view


def _preprocess_fn(name: Optional[str]) -> Callable:
    """numpy -> numpy backbone preprocessing (reid_keras.data.preprocessing); None means none."""
    if name in (None, ""):
        return lambda x: x
    try:
        mode = preprocessing_mode(name)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    if mode == "raw":
        return lambda x: x
    return lambda x: np.asarray(preprocess(x, name))


@dataclasses.dataclass
class EmbeddingModel:
    """A callable image -> feature model with what the data pipeline needs to feed it.

    Attributes:
        embed_fn: maps a float32 / uint8 NHWC batch to features (after `preprocessing`).
        image_size: `(height, width)` the model expects, or None when it accepts any size.
        preprocessing: backbone preprocessing name applied inside `embed`, or None.
        source: the path it was loaded from (named in errors).
        kind: "keras" or "saved_model".
        input_dtype: dtype the underlying function wants ("uint8" for exported SavedModels).
        handle: the loaded object (its variables die with it).
    """

    embed_fn: Callable
    image_size: Optional[tuple]
    preprocessing: Optional[str]
    source: str
    kind: str
    input_dtype: str = "float32"
    handle: object = dataclasses.field(default=None, repr=False)  # keeps a loaded SavedModel alive

    def __post_init__(self):
        # An exported SavedModel preprocesses inside its `embed`: the name is only reported.
        self._pre = _preprocess_fn(self.preprocessing) if self.kind == "keras" else (lambda x: x)

    def embed(self, images) -> np.ndarray:
        """Features of a batch of raw images (NHWC, pixel values 0..255) as a float32 array.

        Raises:
            NonFiniteModelError: the model gave NaN / inf features (the message names `source`).
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"embed expects a batch of RGB images (N, H, W, 3); got shape {images.shape}")
        if self.input_dtype == "uint8":
            batch = images if images.dtype == np.uint8 else np.clip(np.rint(images), 0, 255).astype(np.uint8)
        else:
            batch = self._pre(images.astype(np.float32))
        out = self.embed_fn(batch)
        if isinstance(out, dict):
            out = out["embedding"] if "embedding" in out else next(iter(out.values()))
        out = np.asarray(out, dtype=np.float32)
        out = out.reshape(out.shape[0], -1)
        check_finite_outputs(out, self.source)
        return out

    def __call__(self, images) -> np.ndarray:
        return self.embed(images)


def load_embedding_model(path: str, preprocessing: Optional[str] = None) -> EmbeddingModel:
    """Load `path` (a `.keras` file or a SavedModel folder) as an `EmbeddingModel`.

    Args:
        path: `.keras` file or exported SavedModel folder.
        preprocessing: backbone preprocessing name; overrides what the model records.

    Raises:
        ModelLoadError: missing or damaged path (the message says what is wrong), or no embedding
            branch / `embed` function.
        NonFiniteModelError: NaN / inf weights.
    """
    if inspect_model_path(path) == "saved_model":
        return _load_saved_model(path, preprocessing)
    return _load_keras(path, preprocessing)


def run_config_beside(path: str) -> dict:
    """The config.json of the run folder holding the model file `path` ({} when there is none or it is unreadable)."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    try:
        with open(config, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _sidecar_preprocessing(path: str) -> Optional[str]:
    """`preprocessing` from the run's config.json next to the model, if the run recorded it."""
    value = run_config_beside(path).get("preprocessing")
    return value if isinstance(value, str) else None


def _load_keras(path: str, preprocessing: Optional[str]) -> EmbeddingModel:
    model = load_keras_model(path)
    network = _embedding_network(model, path)
    shape = tuple(network.inputs[0].shape)
    size = (int(shape[1]), int(shape[2])) if shape[1] is not None and shape[2] is not None else None
    return EmbeddingModel(embed_fn=lambda x: network(x, training=False), image_size=size,
                          preprocessing=preprocessing or _sidecar_preprocessing(path),
                          source=path, kind="keras")


def _embedding_network(model, path: str):
    import keras

    try:
        branch = model.get_layer("embedding")
    except ValueError:
        branch = None
    if isinstance(branch, keras.Model):
        if len(branch.inputs) != 1:
            raise ModelLoadError(f"{path!r}: the 'embedding' sub-model has {len(branch.inputs)} inputs, expected 1")
        return branch
    if branch is not None:
        try:
            network = keras.Model(model.inputs, branch.output)
        except (ValueError, AttributeError) as err:
            raise ModelLoadError(f"{path!r}: layer 'embedding' cannot be cut out as a model ({err})") from None
        if len(network.inputs) == 1:
            return network
        raise ModelLoadError(f"{path!r}: layer 'embedding' depends on {len(network.inputs)} inputs, expected 1")
    if len(model.inputs) == 1 and len(model.inputs[0].shape) == 4:
        return model
    raise ModelLoadError(
        f"{path!r} has {len(model.inputs)} inputs and no sub-model or layer named 'embedding': "
        "name the shared branch 'embedding' or pass a single-image-input model")


def _load_saved_model(path: str, preprocessing: Optional[str]) -> EmbeddingModel:
    import tensorflow as tf  # SavedModel signatures have no Keras 3 equivalent

    loaded = load_saved_model(path)
    fn = getattr(loaded, "embed", None)
    spec = None
    if fn is not None and callable(fn):
        concretes = list(getattr(fn, "concrete_functions", []))
        if concretes:
            args = concretes[0].structured_input_signature[0]
            spec = args[0] if args else None
        call = fn
    elif "embed" in getattr(loaded, "signatures", {}):
        signature = loaded.signatures["embed"]
        kwargs = signature.structured_input_signature[1]
        if len(kwargs) != 1:
            raise ModelLoadError(f"{path!r}: the 'embed' signature takes {len(kwargs)} inputs, expected 1 image batch")
        name, spec = next(iter(kwargs.items()))
        call = lambda x: signature(**{name: tf.constant(x)})  # noqa: E731
    else:
        raise ModelLoadError(f"SavedModel {path!r} has no 'embed' function or signature: "
                             "export it with python -m reid_keras.export")
    size = None
    dtype = "uint8"
    if spec is not None and hasattr(spec, "shape"):
        dims = list(spec.shape)
        if len(dims) == 4 and dims[1] is not None and dims[2] is not None:
            size = (int(dims[1]), int(dims[2]))
        dtype = spec.dtype.name
    recorded = getattr(loaded, "image_size", None)
    if size is None and recorded is not None:
        size = tuple(int(v) for v in np.asarray(recorded).reshape(-1)[:2])
    if preprocessing is None and getattr(loaded, "preprocessing", None) is not None:
        value = np.asarray(loaded.preprocessing).item()
        preprocessing = value.decode() if isinstance(value, bytes) else str(value)
    return EmbeddingModel(embed_fn=lambda x: call(tf.constant(x)), image_size=size,
                          preprocessing=preprocessing, source=path, kind="saved_model", input_dtype=dtype,
                          handle=loaded)
