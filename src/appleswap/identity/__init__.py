"""Identity: antelopev2 detection + ArcFace, EVA02-CLIP, the PuLID IDFormer inputs, ID-token files."""
