"""Shells around the afnext library: the web app, the desktop loop, the API server."""
