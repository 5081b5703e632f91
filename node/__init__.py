"""dicom-node: a compressing DICOM store-and-forward node."""

__version__ = "0.1.0"
