import sys

from sam3d.cli import main

sys.exit(main())
