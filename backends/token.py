"""Transitional alias of `tandem.token` (moved there: the contract both tiers share)."""

import sys

from tandem import token as _moved

sys.modules[__name__] = _moved
