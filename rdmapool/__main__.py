import sys

from rdmapool.cli import main

sys.exit(main())
