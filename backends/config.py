"""Transitional alias of `tandem.config` (moved there: the contract both tiers share)."""

import sys

from tandem import config as _moved

sys.modules[__name__] = _moved
