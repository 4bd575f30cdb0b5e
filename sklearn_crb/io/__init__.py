"""Reading and writing: coefficient images and NIfTI maps (:mod:`.images`), saved networks (:mod:`.models`)."""
