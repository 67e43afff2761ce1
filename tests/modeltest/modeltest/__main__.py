import sys

from modeltest.cli import main

sys.exit(main())
