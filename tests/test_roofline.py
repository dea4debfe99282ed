"""bench.roofline: the FP32 peak follows the microarchitecture, not only the ISA flags."""

from __future__ import annotations

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


def test_machine_reports_the_basis() -> None:
    m = roofline.machine()
    assert m["fp32_flop_per_cycle_per_core"] in (8, 16, 32, 64)
    assert m["fp32_flop_per_cycle_basis"]
