"""The HTTP service: Litestar app, lifespan (pools and ingestion loop), controllers.

Importing this package does nothing; :func:`app.server.create_app` builds the app.
"""
