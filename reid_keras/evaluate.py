"""`python -m reid_keras.evaluate`: the command lives in `reid_keras.cli.evaluate`."""
import sys

from reid_keras.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
