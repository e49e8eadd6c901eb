"""Django's session engine: `SESSION_ENGINE = "backends.django"`, with
`backends.django.SessionMiddleware` or Django's own; `backends.django.use(manager, loop=...)`
for sessions outside requests.

The public name of `backends.frameworks.django`."""

from .frameworks.django import *  # noqa: F403
from .frameworks.django import __all__ as __all__
