"""Model zoo: every model takes [0, 1] images and normalizes them in its first layer, ``model.normalize``.

Importing the architecture modules registers their factories.
"""

from cardkit.models.normalize import Normalize
from cardkit.models.registry import create_model, list_models, register_model
from cardkit.models import cnn, resnet, vgg, wide_resnet  # noqa: F401  (registers the factories)
from cardkit.models.arch import model_from_arch

__all__ = ["Normalize", "create_model", "list_models", "model_from_arch", "register_model"]
