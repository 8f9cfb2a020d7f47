"""orchestrate: the top floor, runs the stages (``pretrain``, ``transfer``, ``results``) as one pipeline.

``demo`` (``make demo``: every stage on the toy data, tables at the end), ``sweep`` (``make sweep``: ablation grids),
``chaos`` (``make chaos``: kill / resume and bad-input scenarios) and ``toyprobe`` (the toy ImageNet's random-init and
colour baselines). Nothing below imports this package.
"""
