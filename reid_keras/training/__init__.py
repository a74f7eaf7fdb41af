"""Pieces of the training CLI (`python -m reid_keras.train`): run folders, callbacks, strategy."""
