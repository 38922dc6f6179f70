"""Entry points (`python -m experiments.NAME`) and the scale-point and sweep configs (experiments/configs/).

STARTED is when this process began importing the entry points (`python -m experiments.run` imports this package
first): a run's summary counts its start-up (imports, devices, data) from there.
"""

import time

STARTED = time.perf_counter()
