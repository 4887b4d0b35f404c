"""Applications: swap any photo / folder / video with paste-back, web UI, provenance and watermark."""
