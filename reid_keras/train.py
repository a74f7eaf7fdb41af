"""Entry point of `python -m reid_keras.train`; the command is `reid_keras.cli.train`."""
import sys

from reid_keras.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
