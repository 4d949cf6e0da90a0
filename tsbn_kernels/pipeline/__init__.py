"""Reference training pipeline for NYUv2, Cityscapes, CelebA and PASCAL-Context (issue 6).

``metrics`` (the benchmarks' metrics and Δm), ``dense_data`` (NYUv2 / Cityscapes in the MTAN layout),
``celeba_data`` (the released CelebA layout), ``pascal_data`` (ASTMT's PASCAL_MT layout), ``data``
(``tsbn-data synth``: synthetic sets in those real layouts), ``models`` and ``vit`` (dilated ResNet-50 + ASPP,
ResNet-18, ViT-S/16 with task-specific layer norms; the replicated batch), ``losses``, ``distributed``
(torchrun setup and the rank-independent data split), ``check`` (``tsbn-check``: eager vs fused step by step)
and ``train`` (``tsbn-train``).
"""
