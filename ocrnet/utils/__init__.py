"""Small shared mechanisms: the one atomic file writer, the one interleaved timer, the one
saved-tensor counter and FLOP counting."""
