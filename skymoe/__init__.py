"""skymoe: a data-centric pipeline from a raw web corpus to an evaluated MoE language model.

This folder is the core every stage shares: configuration, storage, the stage contract (Stage,
Plan, the runner, manifests, done-records), the declared pipeline and progress reporting; it
imports nothing heavy. The stages and flows live in the repository's top-level folders and install
under this namespace (``skymoe.pipelines``, ``skymoe.training``, ``skymoe.evaluation``,
``skymoe.flows``, ``skymoe.ablations``).
"""

__version__ = "0.1.0"

# The pipeline's stages, in order; each writes under <root>/<stage>/<fingerprint>/.
PIPELINE_STAGES = ("clean", "tokenize", "train", "evaluate")
