"""DiLoCo outer loop: pseudo-gradients, codecs, the outer optimizer, streaming and overlap."""
