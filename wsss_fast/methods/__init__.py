"""AReAM, GETAM and CRT: losses, CAM and pseudo-label logic (arrive with their issues)."""
