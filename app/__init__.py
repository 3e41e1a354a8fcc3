"""Shells around the afnext library: the web app, the desktop loop, the API server."""

import afnext  # noqa: F401  (`python -m app.X` outside the set-up: a missing requirement is a sentence there)
