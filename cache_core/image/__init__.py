"""Image diffusion through the same block cache: a DiT (`cache_core.models.dit`), its block cache over patch tokens,
the DDIM session, the image feature schema (registered on import), the image caches of the literature and the one
sampling loop, `sample_images`."""

from cache_core.image.features import IMAGE_SCHEMA
from cache_core.image.sample import ImageSampleResult, ImageStepContext, sample_images
from cache_core.image.session import DenoisingSession, ddim_reference

__all__ = ["IMAGE_SCHEMA", "DenoisingSession", "ImageSampleResult", "ImageStepContext", "ddim_reference",
           "sample_images"]
