"""``python -m bench`` (``make bench``): the end-to-end benchmark, see :mod:`bench.e2e`."""

import sys

from bench.e2e import main

sys.exit(main())
