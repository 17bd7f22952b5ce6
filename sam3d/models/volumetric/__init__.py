"""The volumetric wing: Sam3D (3D SAM encoder with adapters, visual-sampler prompts, MLA
decoder) and the 2D -> 3D weight mapping."""
