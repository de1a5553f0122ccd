"""Header styles of three scanner vendors: names, series descriptions, sequence parameters, and where
each puts the diffusion b-value.

Values follow what these vendors' clinical stroke protocols typically write (see the real series under
../shared/realdata); they are plausible, not copies. The b-value locations are the point:
- standard (0018,9087) DiffusionBValue: Philips classic, every vendor's Enhanced MR (MR Diffusion macro)
- Siemens classic: private (0019,100C) IS under creator "SIEMENS MR HEADER"
- GE classic: private (0043,1039) IS multi-value, b-value first, under creator "GEMS_PARM_01"
- Philips classic: private (2001,1003) FL under creator "Philips Imaging DD 001" (plus (0018,9087))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SeriesStyle:
    description: str
    image_type: tuple[str, ...]
    sequence_name: str = ""
    protocol: str = ""


@dataclass(frozen=True)
class VendorStyle:
    key: str
    manufacturer: str
    models: tuple[str, ...]
    software: str | list[str]
    station: str
    field_strengths: tuple[float, ...]
    dwi: SeriesStyle
    dwi_b0: SeriesStyle  # used when b0 and b1000 are split into two series
    adc: SeriesStyle
    flair: SeriesStyle
    t1: SeriesStyle
    localizer: SeriesStyle
    dsc: SeriesStyle
    dwi_scanning_sequence: tuple[str, ...]
    extra: dict = field(default_factory=dict)

    def add_b_value(self, ds: Dataset, b: float, classic: bool) -> None:
        """Put the b-value where this vendor puts it in a classic image."""
        if not classic:
            return  # enhanced: only the standard MR Diffusion macro (written by the builder)
        if self.key == "siemens":
            block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
            block.add_new(0x0C, "IS", str(int(round(b))))
            block.add_new(0x0D, "CS", "DIRECTIONAL" if b > 0 else "NONE")
            ds.SequenceName = f"*ep_b{int(round(b))}{'t' if b > 0 else ''}"
        elif self.key == "ge":
            block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
            block.add_new(0x39, "IS", [str(int(round(b))), "8", "0", "0"])
            ds.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0xBB, "DS", "0")
        elif self.key == "philips":
            block = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
            block.add_new(0x03, "FL", float(b))
            block.add_new(0x04, "CS", "I" if b > 0 else "N")
            ds.DiffusionBValue = float(b)


SIEMENS = VendorStyle(
    key="siemens",
    manufacturer="SIEMENS",
    models=("MAGNETOM Skyra", "MAGNETOM Vida", "MAGNETOM Aera"),
    software="syngo MR E11",
    station="AWP45123",
    field_strengths=(1.5, 3.0),
    dwi=SeriesStyle("ep2d_diff_3scan_trace_p2_TRACEW", ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"),
                    "*ep_b1000t", "ep2d_diff_3scan_trace_p2"),
    dwi_b0=SeriesStyle("ep2d_diff_3scan_trace_p2_b0", ("ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND"),
                       "*ep_b0", "ep2d_diff_3scan_trace_p2"),
    adc=SeriesStyle("ep2d_diff_3scan_trace_p2_ADC", ("DERIVED", "PRIMARY", "DIFFUSION", "ADC", "ND"),
                    "*ep_b0_1000", "ep2d_diff_3scan_trace_p2"),
    flair=SeriesStyle("t2_tirm_tra_dark-fluid_p2", ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"), "*tir2d1_16",
                      "t2_tirm_tra_dark-fluid_p2"),
    t1=SeriesStyle("t1_se_tra", ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"), "*se2d1", "t1_se_tra"),
    localizer=SeriesStyle("localizer", ("ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"), "*fl2d1", "localizer"),
    dsc=SeriesStyle("ep2d_perf_p2", ("ORIGINAL", "PRIMARY", "PERFUSION", "NONE", "ND"), "*epfid2d1_128",
                    "ep2d_perf_p2"),
    dwi_scanning_sequence=("EP",),
)

GE = VendorStyle(
    key="ge",
    manufacturer="GE MEDICAL SYSTEMS",
    models=("SIGNA Premier", "DISCOVERY MR750w", "SIGNA Artist"),
    software=["28", "LX", "MR29.1_EA_2039.g"],
    station="GEHCMR01",
    field_strengths=(1.5, 3.0),
    dwi=SeriesStyle("Ax DWI 1000b", ("ORIGINAL", "PRIMARY", "OTHER"), "", "STROKE/Ax DWI"),
    dwi_b0=SeriesStyle("Ax DWI b0", ("ORIGINAL", "PRIMARY", "OTHER"), "", "STROKE/Ax DWI"),
    adc=SeriesStyle("Apparent Diffusion Coefficient (mm2/s)", ("DERIVED", "SECONDARY", "ADC"), "",
                    "STROKE/Ax DWI"),
    flair=SeriesStyle("Ax T2 FLAIR", ("ORIGINAL", "PRIMARY", "OTHER"), "", "STROKE/Ax T2 FLAIR"),
    t1=SeriesStyle("Ax T1 SE", ("ORIGINAL", "PRIMARY", "OTHER"), "", "STROKE/Ax T1"),
    localizer=SeriesStyle("3Plane Loc", ("ORIGINAL", "PRIMARY", "LOCALIZER"), "", "STROKE/3Plane Loc"),
    dsc=SeriesStyle("Ax Perfusion GRE EPI", ("ORIGINAL", "PRIMARY", "OTHER"), "", "STROKE/Perfusion"),
    dwi_scanning_sequence=("EP", "SE"),
)

PHILIPS = VendorStyle(
    key="philips",
    manufacturer="Philips",
    models=("Ingenia", "Achieva dStream", "Ingenia Elition X"),
    software=["5.7.1", "5.7.1.2"],
    station="PHILIPS-MR1",
    field_strengths=(1.5, 3.0),
    dwi=SeriesStyle("DWI_SENSE", ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), "", "DWI_SENSE"),
    dwi_b0=SeriesStyle("DWI_SENSE_b0", ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), "", "DWI_SENSE"),
    adc=SeriesStyle("dADC_DWI_SENSE", ("DERIVED", "PRIMARY", "ADC", "ADC"), "", "DWI_SENSE"),
    flair=SeriesStyle("FLAIR_longTR SENSE", ("ORIGINAL", "PRIMARY", "M_IR", "M", "IR"), "", "FLAIR_longTR"),
    t1=SeriesStyle("T1W_SE", ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE"), "", "T1W_SE"),
    localizer=SeriesStyle("SURVEY", ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), "", "Survey_MST"),
    dsc=SeriesStyle("PERFUSION_DSC", ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), "", "PERFUSION"),
    dwi_scanning_sequence=("SE",),
)

STYLES = {"siemens": SIEMENS, "ge": GE, "philips": PHILIPS}
