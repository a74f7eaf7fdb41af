"""Entry point of `python -m reid_keras.evaluate_search`; the command is `reid_keras.cli.evaluate_search`."""
import sys

from reid_keras.cli import quiet_tensorflow_logs
from reid_keras.cli.evaluate_search import main

if __name__ == "__main__":
    quiet_tensorflow_logs(sys.argv[1:])  # before anything imports TensorFlow (no cli module does at import)
    sys.exit(main())
