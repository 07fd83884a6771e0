"""srft: a critic labeling service for Step Rejection Fine-Tuning."""

__version__ = "0.1.0"
