"""Reading and writing: coefficient images and NIfTI maps (:mod:`.images`), saved networks (:mod:`.models`),
training sets (:mod:`.datasets`, :mod:`.h5`, :mod:`.manifest`); the output policy over the one atomic writer
(:mod:`._files`)."""
