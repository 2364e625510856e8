"""Data stages: corpus cleaning (``skymoe.pipelines.clean``) and, later, tokenization into Arrow shards."""
