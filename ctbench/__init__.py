"""ctbench: shared foundation of the suite (errors, atomic files, typed configs, paths, run records, checkpoint
reading, toy data).

The stages live in the top-level packages ``pretrain`` and ``transfer``, the tables in ``results``, the whole-pipeline
runs in ``orchestrate`` and the speed measurements in ``benchmarks``; this package holds only what every one of them
needs and imports none of them.
"""

__version__ = "0.1.0"
