"""Training (``pipeline train``): patches, augmentation, losses, the loop and checkpoints.

Grows module by module; today: augmentation (:mod:`.augmentation`) and the U-Net paper's
weight map (:mod:`.weight_map`), both pure NumPy/SciPy, and the losses (:mod:`.losses`).
"""
