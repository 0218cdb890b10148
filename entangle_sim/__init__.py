"""entangle_sim: explain, predict and fix gradient entanglement in margin-based preference optimization."""
__version__ = "0.1.0"
