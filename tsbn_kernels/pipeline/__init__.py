"""Reference training pipeline for NYUv2, Cityscapes, CelebA and PASCAL-Context (issue 6, in progress).

Done: evaluation metrics and Δm (``metrics``); NYUv2 / Cityscapes loaders of the MTAN on-disk format with the
field's augmentation and a synthetic scene generator writing that format (``dense_data``); the CelebA loader of
the released layout and a synthetic-face generator (``celeba_data``); ``tsbn-data synth`` (``data``); the models (``models``: torchvision-named ResNet-50 with dilation + ASPP heads, ResNet-18 with 40
attribute heads, norm bn / tsbn / tssigmabn, the replicated batch); ``tsbn-check`` (``check``); ``tsbn-train``
(``train``: aggregation, amp, channels-last, metrics/Δm per epoch, JSON/CSV, plots, atomic checkpoints with
bitwise resume, NaN stop, gate/Gramian recording for tsbn-analyze).
Not yet: PASCAL-Context (data, metrics, ViT-S with TSLayerNorm), DDP with synchronised task statistics.
"""
