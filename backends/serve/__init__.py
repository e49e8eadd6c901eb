"""Hosting the application: the backend's HTTP/1.1 and WebSocket server, the ASGI/WSGI
adapters, the lifespan protocol, and URL rewriting."""
