"""jaxlse: numerically stable log-sum-exp, softmax and classification losses for JAX."""

from importlib.metadata import PackageNotFoundError, version

from ._linear_ce import linear_cross_entropy as linear_cross_entropy
from ._losses import cross_entropy as cross_entropy
from ._losses import nll_loss as nll_loss
from ._lse import log_softmax as log_softmax
from ._lse import logsumexp as logsumexp
from ._lse import softmax as softmax

try:
    __version__ = version("jaxlse")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "softmax",
]
