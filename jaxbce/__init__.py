"""jaxbce: accurate, fast sigmoid binary cross-entropy for JAX."""

from jaxbce._classification import binary_cross_entropy as binary_cross_entropy
from jaxbce._classification import (
    binary_cross_entropy_with_logits as binary_cross_entropy_with_logits,
)
from jaxbce._classification import pos_weight_from_labels as pos_weight_from_labels
from jaxbce._classification import (
    sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy,
)
from jaxbce._focal import sigmoid_focal_loss as sigmoid_focal_loss
from jaxbce._linear import linear_binary_cross_entropy as linear_binary_cross_entropy
from jaxbce._siglip import siglip_loss as siglip_loss
from jaxbce._sparse import (
    sparse_binary_cross_entropy_with_logits as sparse_binary_cross_entropy_with_logits,
)
from jaxbce._value_checks import check_inputs as check_inputs
from jaxbce._value_checks import check_positive_indices as check_positive_indices

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "check_inputs",
    "check_positive_indices",
    "linear_binary_cross_entropy",
    "pos_weight_from_labels",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "siglip_loss",
    "sparse_binary_cross_entropy_with_logits",
]
