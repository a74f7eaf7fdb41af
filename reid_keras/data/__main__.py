"""`python -m reid_keras.data`: the command lives in `reid_keras.cli.data`."""
import sys

from reid_keras.cli.data import main

if __name__ == "__main__":
    sys.exit(main())
