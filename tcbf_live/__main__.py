"""`python -m tcbf_live`: the `tcbf-live` console script."""

import sys

from tcbf_live.stream.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
