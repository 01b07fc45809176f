"""``python -m pop3proto.bindings``: the ``pop3proto`` command line."""

import sys

from .cli import main

sys.exit(main())
