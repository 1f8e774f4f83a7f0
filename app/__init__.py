"""HTTP service: the Litestar app, its lifespan and the command line."""
