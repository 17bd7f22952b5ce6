"""The shared SAM core: build any SAM ViT at any input size from a preset, read SAM
checkpoints, LoRA, and memory savers for SAM's ViT (state-dict keys unchanged)."""
