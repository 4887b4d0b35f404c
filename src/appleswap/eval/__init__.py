"""Evaluation: the FFHQ protocol metrics (one file each) and the report."""
