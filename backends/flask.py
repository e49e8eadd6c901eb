"""Flask's session interface: `app.session_interface = backends.flask.SessionInterface()`.

The public name of `backends.frameworks.flask`."""

from .frameworks.flask import *  # noqa: F403
from .frameworks.flask import __all__ as __all__
