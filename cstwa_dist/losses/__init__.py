"""Training objectives, one module per loss family; every loss maps ``(ModelOutput, Batch)`` to a loss.

* ``common``: the per-sample BCE on logits, means over the real rows of the global batch, and
  ``Collectives`` (how a loss sees the other ranks).
* ``bce``: plain BCE objectives: click only (pre-training), two tasks over the entire space (ESMM and
  the mixture-of-experts baselines) or with the purchase term on clicked rows only (MLP).
* ``constrained``: BCE plus the behavioural constraint ``max(p_purchase − p_click, 0)``: AITM's
  calibrator, and CSTWA's Eq. 20 with the Curse Escaper's weights (``curse_escaper``).
* ``counterfactual``: ESCM²'s IPS / doubly robust risks on the clicked space.

Losses sit beside ``models/`` rather than inside ``train/`` because they are, like models, pure
functions of tensors: the registry (``cstwa_dist/registry.py``) pairs the two, and the trainer only
calls what the registry built. Nothing here knows about ranks except through ``Collectives``.
"""
