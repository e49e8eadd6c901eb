"""A Django project whose `request.session` is tandem's replicated session.

    tandem up --config config/default.toml --app examples.django_app.wsgi:application
    tandem up --config config/default.toml --app examples.django_app.asgi:application
"""
