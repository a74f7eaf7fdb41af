"""The commands: argument parsing over the library, one module per `python -m reid_keras.<command>`.

Library modules never import from here (tests/test_imports.py checks it).

`quiet_tensorflow_logs` runs first in every `python -m reid_keras.<command>` entry point, before
anything imports TensorFlow: it hides TensorFlow's start-up chatter (C++ INFO lines such as "oneDNN
custom operations are on" and "This TensorFlow binary is optimized ...", and the Python "tensorflow"
logger's warnings) unless the user asked for them with `--verbose`, `REID_KERAS_VERBOSE=1`, or by
setting `TF_CPP_MIN_LOG_LEVEL` themselves. Warnings and errors of the C++ runtime still show.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "REID_KERAS_VERBOSE"
TF_LOG_ENV = "TF_CPP_MIN_LOG_LEVEL"
QUIET_TF_LOG_LEVEL = "1"  # C++ logs: 0 = all, 1 = no INFO, 2 = no WARNING, 3 = no ERROR

# Lines TensorFlow prints while it is imported that TF_CPP_MIN_LOG_LEVEL does not stop (TF 2.21 logs the
# oneDNN notice through absl before reading it): absl / glog INFO lines, absl's own notice, and the
# continuation line of the CPU-instructions notice.
_STARTUP_NOISE = re.compile(
    r"^(I\d{4} [\d:.]+ +\d+ \S+:\d+\] "                 # absl: I0000 00:00:1796490890.627538  683 port.cc:153]
    r"|\d{4}-\d\d-\d\d [\d:.]+: I \S+:\d+\] "             # older TF: 2024-01-11 05:40:05.061907: I x.cc:182]
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)")


def verbose_requested(argv) -> bool:
    """Whether the user asked to see TensorFlow's logs: `--verbose` among `argv`, or REID_KERAS_VERBOSE set
    to anything but "", "0", "false" or "no"."""
    flag = VERBOSE_FLAG in (argv or ())
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_tensorflow_logs(argv=None) -> bool:
    """Hide TensorFlow's start-up log lines in this process, unless the user asked for them.

    Call before TensorFlow is imported. Sets TF_CPP_MIN_LOG_LEVEL=1 (C++ INFO lines off), the Python
    "tensorflow" logger to ERROR, and filters what `import tensorflow` prints on stderr (file
    descriptor 2, where C++ writes) through `_STARTUP_NOISE`; every other line is written back.

    Args:
        argv: the command's arguments (default: sys.argv[1:]); `--verbose` among them leaves all logs on.

    Returns:
        True when the logs were quieted; False for `--verbose`, REID_KERAS_VERBOSE, or a
        TF_CPP_MIN_LOG_LEVEL the user set (their choice is kept as it is).
    """
    argv = sys.argv[1:] if argv is None else argv
    if verbose_requested(argv) or TF_LOG_ENV in os.environ:
        return False
    os.environ[TF_LOG_ENV] = QUIET_TF_LOG_LEVEL
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # tf.get_logger() is this logger; it keeps the level
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
    return True


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once and wraps its loader so that the import runs with stderr filtered."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one import only; the real finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None  # not installed: Python raises its usual ModuleNotFoundError
        spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    """Runs the wrapped loader with stderr filtered, then hands the module its own loader back."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_filename, is_package, get_resource_reader, ...
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        try:
            with filtered_stderr(_STARTUP_NOISE):
                self.loader.exec_module(module)
        finally:
            module.__loader__ = self.loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.loader


class filtered_stderr:
    """Context manager: everything written to file descriptor 2 inside it (by Python or by C/C++ code) is
    kept in a temporary file, then written back without the lines matching `pattern`."""

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern

    def __enter__(self):
        sys.stderr.flush()
        self._capture = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._capture.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._capture.seek(0)
        text = self._capture.read().decode("utf-8", errors="replace")
        self._capture.close()
        kept = [line for line in text.splitlines(keepends=True) if not self.pattern.match(line)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
        return False
