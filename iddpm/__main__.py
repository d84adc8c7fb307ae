import sys

from iddpm.cli.main import main

sys.exit(main())
