"""tests/train: the harness module sits next to the tests; spawned ranks import it from here."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
