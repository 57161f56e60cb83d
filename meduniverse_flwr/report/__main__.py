"""``python -m meduniverse_flwr.report``: the per-run tables and, over several runs, the report
(``multi``)."""

import sys

from meduniverse_flwr.report.multi import main

sys.exit(main())
