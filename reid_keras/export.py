"""Entry point of `python -m reid_keras.export`; the command is `reid_keras.cli.export`."""
import sys

from reid_keras.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
