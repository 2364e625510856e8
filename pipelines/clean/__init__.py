"""SkyPile-style corpus cleaning. The stage function is :func:`skymoe.pipelines.clean.stage.run_clean`."""
