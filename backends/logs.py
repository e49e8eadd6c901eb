"""Transitional alias of `tandem.logs` (moved there: the contract both tiers share)."""

import sys

from tandem import logs as _moved

sys.modules[__name__] = _moved
