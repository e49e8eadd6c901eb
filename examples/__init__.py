"""Example applications run behind tandem (see the README's "Frameworks" section)."""
