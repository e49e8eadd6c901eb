"""tandem's backend runtime: hosts a WSGI/ASGI app, keeps its sessions, replicates them."""
