"""DSC-PWI perfusion numerics (numpy/scipy only): concentration, automatic AIF, oSVD/sSVD, model-based Tmax, maps.

Pure arrays in, arrays out; nothing here knows DICOM. ``worker.pipeline.perfusion`` feeds it the
loaded series and writes the results. Method and validated range: docs/perfusion.md.
"""

from models.perfusion.aif import AifResult, select_aif
from models.perfusion.deconv import DEFAULT_OI, Deconvolution, osvd, residue_peak_time, ssvd
from models.perfusion.maps import DscOptions, DscResult, compute_maps, voxel_maps
from models.perfusion.signal import concentration, detect_bolus, motion_check
from models.perfusion.tmax_fit import fit_tmax

__all__ = ["DEFAULT_OI", "AifResult", "Deconvolution", "DscOptions", "DscResult", "compute_maps",
           "concentration", "detect_bolus", "fit_tmax", "motion_check", "osvd", "residue_peak_time", "select_aif", "ssvd", "voxel_maps"]
