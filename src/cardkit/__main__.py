import sys

from cardkit.cli import main

sys.exit(main())
