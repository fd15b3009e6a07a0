import sys

from ume_edge.client.cli import main

sys.exit(main())
