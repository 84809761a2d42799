"""One process: its peers in the process group, its device, its signals, its RNG state."""
