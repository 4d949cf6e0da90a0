"""Reference training pipeline for NYUv2, Cityscapes, CelebA and PASCAL-Context (issue 6, in progress):
so far the evaluation metrics and Δm (``metrics``)."""
