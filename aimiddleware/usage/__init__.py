"""Usage: what a call used and cost."""

from aimiddleware.usage.models import Usage

__all__ = ["Usage"]
