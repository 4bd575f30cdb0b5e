"""``python -m sklearn_crb.cli``."""

import sys

from sklearn_crb.cli._main import main

sys.exit(main())
