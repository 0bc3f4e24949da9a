import sys

from selfxit.cli import main

sys.exit(main())
