"""The DICOM C-STORE/C-ECHO SCP: presentation contexts, access control, the pynetdicom AE."""
