"""The runtime inside each training process (see session.py for the API)."""

from .integration import Integration, RankState, TorchIntegration
from .session import RecoveryImpossible, RecoveryRequested, Session

__all__ = ["Integration", "RankState", "TorchIntegration", "Session", "RecoveryRequested",
           "RecoveryImpossible"]
