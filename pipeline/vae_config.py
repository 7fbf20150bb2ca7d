"""The ``vae`` section of a pipeline config (``task: vae``): model, objective, remedies, data, evaluation.

The architecture (:class:`models.vae.VAEModelConfig`), the estimator and objective
(:class:`models.vae.objectives.ObjectiveSpec`) and the posterior-collapse remedies
(:mod:`models.vae.remedies`) are the models package's own typed configs; this module adds what only
the pipeline needs (sentence data options and the evaluation settings) and the checks between them.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from models.config import StrictConfig
from models.vae import VAEModelConfig
from models.vae.objectives import ObjectiveSpec
from models.vae.remedies import AnnealingConfig, PretrainingConfig, SoftFreeBitsConfig

__all__ = ["VAEConfig", "VAEDataConfig", "VAEEvaluateConfig"]


class VAEDataConfig(StrictConfig):
    """How sentences are cut from the prepared corpus."""

    max_length: int | None = Field(
        default=None, gt=0, description="Truncate sentences to this many tokens (the thesis used 35 on PTB); null = keep "
        "whole sentences."
    )
    include_eos: bool = Field(
        default=True, description="Predict the end-of-sentence token (counted in per-token NLL / perplexity); false for "
        "the synthetic task, whose optimum is then ln 10000."
    )


class VAEEvaluateConfig(StrictConfig):
    """Importance-sampled evaluation: during training (2TA's validation loss) and the final one."""

    training_samples: int = Field(
        default=100, gt=0, description="Importance samples K of the validation NLL that 2TA compares during training."
    )
    training_sentences: int | None = Field(
        default=1000, gt=0, description="Validation sentences scored during training (the first ones); null = all."
    )
    valid_samples: int = Field(default=100, gt=0, description="Importance samples K of the final validation NLL "
                               "(thesis: 100).")
    test_samples: int = Field(default=500, gt=0, description="Importance samples K of the final test NLL (thesis: 500).")
    chunk_size: int = Field(
        default=100, gt=0, description="Samples scored at once per sentence batch (bounds memory; the result does not "
        "depend on it)."
    )
    batch_size: int = Field(default=64, gt=0, description="Sentences per batch of the final evaluation.")
    max_sentences: int | None = Field(
        default=None, gt=0, description="Score at most this many sentences of valid and test; null = all."
    )
    report_sentences: int = Field(
        default=8, ge=0, description="Prior samples and reconstructed validation sentences in the samples report "
        "(samples/vae_samples.html and .txt, with interpolations); 0 = no report."
    )
    latent_map_points: int = Field(
        default=2000, ge=0, description="Validation sentences on the latent map (posterior means by PCA and t-SNE, "
        "coloured by label); 0 = no map."
    )


class VAEConfig(StrictConfig):
    """A sentence VAE (thesis ch. 5): architecture, estimator + objective, remedies, data, evaluation."""

    model: VAEModelConfig = Field(default_factory=VAEModelConfig)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    annealing: AnnealingConfig = Field(default_factory=AnnealingConfig)
    soft_free_bits: SoftFreeBitsConfig = Field(default_factory=SoftFreeBitsConfig)
    pretraining: PretrainingConfig = Field(default_factory=PretrainingConfig)
    data: VAEDataConfig = Field(default_factory=VAEDataConfig)
    evaluate: VAEEvaluateConfig = Field(default_factory=VAEEvaluateConfig)

    @model_validator(mode="after")
    def _remedies_need_a_kl_term(self) -> VAEConfig:
        weighted = self.objective.estimator == "elbo" and self.objective.kind == "standard"
        uses = [name for name, on in (("vae.annealing", self.annealing.schedule != "constant"),
                                      ("vae.soft_free_bits", self.soft_free_bits.enabled),
                                      ("vae.pretraining", self.pretraining.enabled)) if on]
        if uses and not weighted:
            raise ValueError(
                f"{', '.join(uses)} weight the analytic KL term, which only vae.objective.estimator elbo with "
                f"vae.objective.kind standard has (got {self.objective.estimator} / {self.objective.kind}); use those, "
                "or the MICMCO weight vae.objective.mi_weight instead"
            )
        return self

    @model_validator(mode="after")
    def _vq_trains_with_elbo(self) -> VAEConfig:
        objective = self.objective
        if self.model.latent == "vq" and (objective.estimator, objective.kind, objective.samples) != ("elbo", "standard", 1):
            raise ValueError(
                "vae.model.latent 'vq' (VQ-VAE) trains with its own objective, log p(x|z_q) + the commitment loss, "
                "without a mutual-information term (thesis §5.A) and with a point-mass posterior (all samples "
                f"equal); got vae.objective.estimator {objective.estimator!r}, kind {objective.kind!r}, samples "
                f"{objective.samples}: set vae.objective.estimator: elbo, kind: standard, samples: 1 and drop "
                "mi_weight / alpha / kl_samples (control the latent usage with vae.model.num_latents and "
                "num_categories instead: KL = num_latents x ln num_categories)"
            )
        return self
