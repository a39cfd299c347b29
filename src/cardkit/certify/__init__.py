"""Certified robustness: bounds on a network's outputs over a whole threat region."""

from cardkit.certify.ibp import Bounds, ibp_bounds, ibp_margin_bounds, supported_layers

__all__ = ["Bounds", "ibp_bounds", "ibp_margin_bounds", "supported_layers"]
