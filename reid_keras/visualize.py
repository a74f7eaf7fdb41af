"""`python -m reid_keras.visualize`: the command lives in `reid_keras.cli.visualize`."""
import sys

from reid_keras.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
