"""DIMSE statuses the node answers with (PS3.4 B.2.3 for C-STORE, PS3.7 C for the rest)."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot Understand
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: Data Set does not match SOP Class
PROCESSING_FAILURE = 0x0110
