"""SkyPile-style corpus cleaning. The stage function is :class:`skymoe.pipelines.clean.stage.CleanStage`."""
