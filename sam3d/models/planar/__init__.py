"""The planar wing: 2D SAM adaptations, one file each (TopoLoRA-SAM, SAMUS, DeSAM)."""
