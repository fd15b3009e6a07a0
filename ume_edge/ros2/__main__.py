import sys

from ume_edge.ros2.cli import main

sys.exit(main())
