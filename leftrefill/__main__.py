"""``python -m leftrefill fill|nvs|realfill ...``: the one-pair command line (leftrefill.commands)."""

import sys

from leftrefill.commands import main

sys.exit(main())
