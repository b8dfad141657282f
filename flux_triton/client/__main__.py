"""``python -m flux_triton.client``: see ``client.cli``."""

import sys

from flux_triton.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
