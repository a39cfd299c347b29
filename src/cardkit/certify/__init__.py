"""Certified robustness: bounds on a network's outputs over a whole threat region."""

from cardkit.certify.crown import crown_bounds, crown_margin_bounds
from cardkit.certify.ibp import Bounds, ibp_bounds, ibp_margin_bounds, supported_layers
from cardkit.certify.verify import VerificationResult, margin_lower_bounds, verified_accuracy

__all__ = ["Bounds", "crown_bounds", "crown_margin_bounds", "ibp_bounds", "ibp_margin_bounds", "supported_layers",
           "VerificationResult", "margin_lower_bounds", "verified_accuracy"]
