"""Face tools: detection, FFHQ alignment and paste-back, 68 landmarks + iris, face masks and segmenters."""
