"""bnlab: batch normalization done right, measured, and reproduced."""
__version__ = "0.1.0"
