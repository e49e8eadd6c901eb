"""Framework integrations: Django's session engine and Flask's session interface. Their
public names stay `backends.django` and `backends.flask`."""
