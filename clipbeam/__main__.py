"""`python -m clipbeam` is the `clipbeam` command."""

import sys

from clipbeam.cli import main

sys.exit(main())
