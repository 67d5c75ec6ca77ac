"""AReAM, GETAM and CRT: losses, CAM and pseudo-label logic (arrive with their issues)."""

from wsss_fast.methods.aream import AReAM, AReAMConfig

__all__ = ["AReAM", "AReAMConfig"]
