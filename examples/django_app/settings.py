"""Settings of the example Django project: what matters for tandem is marked."""

SECRET_KEY = "example-only-not-secret"  # Django's own signing (CSRF); tandem uses its own
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}  # sessions need no database
USE_TZ = True
TIME_ZONE = "UTC"

# tandem: the replicated session is Django's session ...
SESSION_ENGINE = "backends.django"
MIDDLEWARE = [
    # ... and this middleware (in place of django.contrib.sessions') sets no cookie of its
    # own: tandem's token, by cookie or in URLs, is what names the session.
    "backends.django.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
# CSRF token in the session rather than in a cookie of its own, so forms also work for
# clients without cookies (URL rewriting).
CSRF_USE_SESSIONS = True
