"""dtrain: distributed, fault-tolerant training of weight-sharing supernets."""

__version__ = "0.1.0"
