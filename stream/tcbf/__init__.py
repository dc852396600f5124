"""The science core: calibration, accumulators, alignment, aberrations, image, dose (pure)."""
