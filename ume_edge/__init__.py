"""ume-edge: deploy UME-MMA multi-modal models, robust to missing modalities, on edge and datacenter GPUs."""

__version__ = "0.3.0"
