"""Sentence VAEs (thesis ch. 5): config, latents, encoders, decoders and the model.

The estimators (:mod:`models.vae.estimators`), objectives (:mod:`models.vae.objectives`) and
posterior-collapse remedies (:mod:`models.vae.remedies`) are imported from their modules.
"""

from .config import VAEModelConfig
from .decoder import LatentInput, MLPDecoder, RecurrentDecoder
from .encoder import MLPEncoder, RecurrentEncoder
from .latents import CategoricalLatent, GaussianLatent
from .model import LatentTerms, SentenceVAE, build_latent

__all__ = [
    "VAEModelConfig",
    "SentenceVAE",
    "LatentTerms",
    "build_latent",
    "GaussianLatent",
    "CategoricalLatent",
    "RecurrentEncoder",
    "MLPEncoder",
    "RecurrentDecoder",
    "MLPDecoder",
    "LatentInput",
]
