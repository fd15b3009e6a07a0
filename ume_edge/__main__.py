import sys

from ume_edge.cli import main

sys.exit(main())
