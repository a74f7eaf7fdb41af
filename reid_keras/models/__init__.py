"""Model builders (one module per paper model); `load_model` reopens a saved one."""


def load_model(path: str, compile: bool = True):
    """`keras.saving.load_model` (safe mode) for a `.keras` file written by reid_keras, e.g. a run's
    `last.keras`: imports the package's model modules first, so their registered layers, losses and
    schedules deserialise in a fresh Python process (plain Keras would not know `SquareLayer`)."""
    import keras

    from reid_keras.models.loading import _register_package_layers

    _register_package_layers()
    return keras.saving.load_model(path, compile=compile, safe_mode=True)
