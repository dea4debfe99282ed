"""bench.roofline: the FP32 peak follows the microarchitecture, not only the ISA flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedkit_bench import roofline


def _cpuinfo(vendor: str, family: int, model: int, flags: str) -> str:
    return (
        f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        f"model name\t: test cpu\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu sse2 avx fma {flags}\n"
    )


AVX512 = "avx2 avx512f avx512bw avx512_vnni"


def test_zen4_avx512_counts_half_width() -> None:
    # Zen 4 (family 19h, model 11h: EPYC 9004) reports AVX-512 but has 256-bit FMA pipes.
    flops, basis = roofline.fp32_flop_per_cycle(_cpuinfo("AuthenticAMD", 25, 0x11, AVX512))
    assert flops == 32 and "Zen 3/4" in basis


def test_other_microarchitectures() -> None:
    assert roofline.fp32_flop_per_cycle(_cpuinfo("AuthenticAMD", 25, 1, "avx2"))[0] == 32
    assert roofline.fp32_flop_per_cycle(_cpuinfo("AuthenticAMD", 23, 0x31, "avx2"))[0] == 32
    assert roofline.fp32_flop_per_cycle(_cpuinfo("AuthenticAMD", 23, 1, "avx2"))[0] == 16
    # Unidentified AVX-512 parts keep the two-unit upper bound; plain AVX2 is 32.
    assert roofline.fp32_flop_per_cycle(_cpuinfo("GenuineIntel", 6, 85, AVX512))[0] == 64
    assert roofline.fp32_flop_per_cycle(_cpuinfo("GenuineIntel", 6, 60, "avx2"))[0] == 32
    assert roofline.fp32_flop_per_cycle("")[0] == 8
    assert roofline.fp32_flop_per_cycle(_cpuinfo("AuthenticAMD", 0, 0, "") + "junk")[0] == 8


class _ProcCpuinfo:
    """Stands in for ``Path`` in roofline: /proc/cpuinfo reads as ``TEXT`` (None: unreadable)."""

    TEXT: str | None = None

    def __init__(self, path: str) -> None:
        assert path == "/proc/cpuinfo"

    def read_text(self) -> str:
        if self.TEXT is None:
            raise OSError("no /proc/cpuinfo")
        return self.TEXT


@pytest.mark.parametrize(
    ("cpuinfo", "flops", "basis", "peak"),
    [
        # Two CPUs at 3.0 and 2.0 GHz (mean 2.5), 4 usable cores: peak = 4 × 2.5 × FLOP/cycle.
        (("GenuineIntel", 6, 85, AVX512), 64, "AVX-512F", 640.0),
        (("AuthenticAMD", 23, 1, "avx2"), 16, "Zen/Zen+", 160.0),
        (("AuthenticAMD", 25, 0x11, AVX512), 32, "Zen 3/4", 320.0),
        (None, 8, "no AVX2", None),  # unreadable: no clock, so no peak
    ],
)
def test_machine_derives_its_peak_from_cpuinfo(
    monkeypatch: pytest.MonkeyPatch,
    cpuinfo: tuple[str, int, int, str] | None,
    flops: int,
    basis: str,
    peak: float | None,
) -> None:
    text = None if cpuinfo is None else _cpuinfo(*cpuinfo)
    if text is not None:
        text += "\n" + text.replace("processor\t: 0", "processor\t: 1").replace("3000.", "2000.")
    monkeypatch.setattr(_ProcCpuinfo, "TEXT", text)
    monkeypatch.setattr(roofline, "Path", _ProcCpuinfo)
    monkeypatch.setattr(roofline, "_cores", lambda: 4)
    m = roofline.machine()
    assert m["fp32_flop_per_cycle_per_core"] == flops
    assert basis in m["fp32_flop_per_cycle_basis"]
    assert m["cores"] == 4 and m["peak_gflops_estimate"] == peak
    assert m["ghz"] == (None if text is None else 2.5)
    assert m["cpu"] == ("unknown" if text is None else "test cpu")
    assert m["isa"]["avx512f"] == ("avx512f" in (text or ""))


def test_machine_reads_this_cpus_flags() -> None:
    """On this machine: the ISA is the flags line of /proc/cpuinfo, and the FLOP/cycle
    figure and its basis the ones the module's rule gives for its first CPU's vendor,
    family, model and flags (the rule restated here, from the module's docstring)."""
    first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in first.splitlines())}
    flags = set(fields.get("flags", "").split())
    family, model = int(fields.get("cpu family", "-1")), int(fields.get("model", "-1"))
    amd = fields.get("vendor_id") == "AuthenticAMD" and "avx2" in flags
    if amd and family == 0x19:
        want = (32, "Zen 3/4")
    elif amd and family == 0x17:
        want = (32, "Zen 2") if model >= 0x30 else (16, "Zen/Zen+")
    elif "avx512f" in flags:
        want = (64, "AVX-512F")
    else:
        want = (32, "AVX2+FMA") if "avx2" in flags else (8, "no AVX2")
    m = roofline.machine()
    assert m["isa"]["avx2"] == ("avx2" in flags)
    assert m["isa"]["avx512f"] == ("avx512f" in flags)
    assert m["fp32_flop_per_cycle_per_core"] == want[0]
    assert want[1] in m["fp32_flop_per_cycle_basis"]
