"""`python -m pipelines.train.voice`: the voice recipes' command line (`pipelines.train.voice.cli`)."""

import sys

from pipelines.train.voice.cli import main

if __name__ == "__main__":
    sys.exit(main())
