"""The bundled trainer: fine-tune a causal LM on srft exports with step-masked loss.

Needs the `train` extra (torch, transformers). The API and the workers never import it.
"""
