"""SkyPile-style corpus cleaning. The stage function is :func:`pipelines.clean.stage.run_clean`."""
