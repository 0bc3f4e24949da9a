"""``python -m selfxit``: the same as the ``selfxit`` console script (``selfxit.cli:main``)."""
import sys

from selfxit.cli import main

sys.exit(main())
