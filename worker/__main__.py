import sys

from worker._cli import main

sys.exit(main())
