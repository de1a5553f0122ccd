"""2.5D conditional DDPM that synthesises Tmax maps from DWI, FLAIR and the infarct-core mask.

Pure torch / numpy / MONAI: no DICOM, no Celery, no database (import-linter enforces it).
"""
