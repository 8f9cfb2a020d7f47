"""Shared pieces of the classification evaluations (``transfer.linear``, ``transfer.semisup``).

- :mod:`~transfer.classify.config`: typed configs, the presets in ``transfer/presets/`` and how they resolve;
- :mod:`~transfer.classify.data`: transforms, the seeded resumable epoch order, the semi-supervised subset lists;
- :mod:`~transfer.classify.backbone`: which backbone ``--ckpt`` means, the run name, the frozen-weights check;
- :mod:`~transfer.classify.engine`: the training loop shared by both evaluations (schedule, DDP, checkpoints,
  auto-resume, top-1/top-5 and best_acc1, metrics, log.txt, kept checkpoints);
- :mod:`~transfer.classify.protocol`: the run record's ``protocol`` entry (the original evaluation and this run's
  departures from it).
"""
