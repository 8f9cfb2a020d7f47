"""ctbench: shared foundation of the suite (errors, atomic files, typed configs, paths, toy data, demo).

The stages themselves live in the top-level packages ``pretrain``, ``transfer``, ``results`` and ``benchmarks``;
this package holds only what every stage needs and the orchestration of the whole pipeline.
"""

__version__ = "0.1.0"
