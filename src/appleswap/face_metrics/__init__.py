"""Face-analysis networks that training and evaluation both use (ArcFace IR-SE50, the 3DMM expression
regressor, the MediaPipe face mesh, HopeNet head pose), so that training never imports evaluation code."""
