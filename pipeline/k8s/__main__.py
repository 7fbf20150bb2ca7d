"""``python -m pipeline.k8s <command>``: see :mod:`pipeline.k8s.commands`."""

import sys

from pipeline.k8s.commands import main

sys.exit(main())
