"""polymae: pseudo-label → MultiMAE pretraining → multi-task → evaluate → publish.

The repository root is this package; its folders are the sub-packages
``polymae.models``, ``polymae.datasets``, ``polymae.pipeline`` and ``polymae.jobs``.
"""

__version__ = "0.1.0"
