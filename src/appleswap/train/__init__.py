"""Training: teacher (conditional deblurring), pseudo-triplets, student; accelerate for one to many GPUs."""
