"""The APPLE transformer: diffusers FLUX + condition branch (LoRA on condition tokens) + PuLID ID cross-attention."""
