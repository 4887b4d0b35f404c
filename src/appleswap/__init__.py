"""appleswap: APPLE (attribute-preserving pseudo-labeling) face swapping on FLUX + PuLID.

Stages, in pipeline order: ``faces`` (detect, align, landmarks, masks) -> ``preprocess`` (condition images,
scores, dataset layout) -> ``identity`` (PuLID ID tokens) -> ``model`` + ``sampling`` (the three-branch
transformer and its samplers) -> ``pipeline`` (SwapPipeline) -> ``train`` -> ``eval`` -> ``app``.
Nothing is imported eagerly, so ``import appleswap`` is cheap.
"""

__version__ = "0.1.0"
