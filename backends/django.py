"""Django's session engine: `SESSION_ENGINE = "backends.django"`, and
`backends.django.SessionMiddleware` in place of Django's.

The public name of `backends.frameworks.django`."""

from .frameworks.django import *  # noqa: F403
from .frameworks.django import __all__ as __all__
