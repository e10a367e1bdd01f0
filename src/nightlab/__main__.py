import sys

from nightlab.cli import main

sys.exit(main())
