"""DICOM writers for the phantom in several vendors' header styles (classic and enhanced MR)."""
