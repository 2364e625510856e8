"""Data stages: corpus cleaning (``pipelines.clean``) and, later, tokenization into Arrow shards."""
