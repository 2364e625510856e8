"""skymoe: a data-centric pipeline from a raw web corpus to an evaluated MoE language model.

This package is the core every stage shares: configuration, storage, the stage contract
(fingerprints, done-records, manifests) and progress reporting. It imports nothing heavy.
"""

__version__ = "0.1.0"

# The pipeline's stages, in order; each writes under <root>/<stage>/<fingerprint>/.
PIPELINE_STAGES = ("clean", "tokenize", "train", "evaluate")
