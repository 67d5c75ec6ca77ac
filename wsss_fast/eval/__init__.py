"""mIoU, CAM evaluation and overlays (arrive with the engine issue)."""
