"""SAM-Med3D (uni-medical) as a model kind: one concept a module.

- :mod:`.image_encoder3d`: the 3D ViT and its neck;
- :mod:`.prompt_encoder3d`: clicks and the previous mask;
- :mod:`.mask_decoder3d`: the two-way transformer and the mask head;
- :mod:`.model`: :class:`SamMed3D` (encode / decode / forward, like ``Sam3D``);
- :mod:`.build`: presets (``configs/sammed3d/``) and :func:`build_sammed3d`;
- :mod:`.checkpoint`: official and medim checkpoints, with a load report.
"""
