"""Entry point of `python -m reid_keras.match`; the command is `reid_keras.cli.match`."""
import sys

from reid_keras.cli.match import main

if __name__ == "__main__":
    sys.exit(main())
