"""Entry point of `python -m reid_keras.experiment`; the command is `reid_keras.cli.experiment`."""
import sys

from reid_keras.cli.experiment import main

if __name__ == "__main__":
    sys.exit(main())
