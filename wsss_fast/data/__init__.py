"""VOC 2012, COCO 2014 and the built-in synthetic data set (arrive with the engine issue)."""
