"""Reference training pipeline for NYUv2, Cityscapes, CelebA and PASCAL-Context (issue 6, in progress).

Done: evaluation metrics and Δm (``metrics``); NYUv2 / Cityscapes loaders of the MTAN on-disk format with the
field's augmentation, a synthetic scene generator writing that format, and ``tsbn-data synth`` (``dense_data``,
``data``). Not yet: CelebA and PASCAL-Context data, the models, tsbn-train and tsbn-check.
"""
