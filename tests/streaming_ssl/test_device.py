"""cpu_kind: the name every figure carries, read from /proc/cpuinfo's text."""

import os

from streaming_ssl.device import cpu_kind, cpu_supports_bf16

PRECISION = "bf16" if cpu_supports_bf16() else "fp32"  # torch decides, whatever the flags say


def _cpuinfo(name: str | None, family: str | None, model: str | None, flags: str) -> str:
    """Two processors' blocks (the second different, to show that the first is read), as the kernel writes them."""
    first = ["processor\t: 0", "vendor_id\t: GenuineIntel"]
    first += [f"cpu family\t: {family}"] if family else []
    first += [f"model\t\t: {model}"] if model else []
    first += [f"model name\t: {name}"] if name else []
    first += [f"flags\t\t: {flags}", ""]
    return "\n".join(first + ["processor\t: 1", "model name\t: another CPU", "flags\t\t: sse2", ""])


def test_an_intel_xeon_is_named_by_its_generation_and_amx() -> None:
    text = _cpuinfo("Intel(R) Xeon(R) Processor", "6", "207",
                    "fpu sse2 avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8")
    assert cpu_kind(text) == (f"Intel(R) Xeon(R) Processor (family 6 model 207), {os.cpu_count()} cores, "
                              f"AVX2/AVX512/AVX512-BF16/AMX-BF16: {PRECISION}")


def test_a_zen4_has_avx512_bf16_without_amx_and_an_avx2_cpu_says_so() -> None:
    zen4 = cpu_kind(_cpuinfo("AMD EPYC 9R14", "25", "17", "sse2 avx2 avx512f avx512_bf16"))
    assert zen4.startswith("AMD EPYC 9R14 (family 25 model 17), ") and "AVX2/AVX512/AVX512-BF16:" in zen4
    assert "AMX" not in zen4
    avx2 = cpu_kind(_cpuinfo("AMD EPYC 7B13", "25", "1", "sse2 avx2 fma"))
    assert avx2.endswith(f"AVX2: {PRECISION}") and "AVX512" not in avx2


def test_an_arm_cpuinfo_without_model_name_or_flags_still_names_something() -> None:
    text = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
    kind = cpu_kind(text)
    name, rest = kind.split(", ", 1)
    assert name and "family" not in name
    assert rest == f"{os.cpu_count()} cores, no AVX2: {PRECISION}"


def test_this_machine_reads_its_own_cpuinfo() -> None:
    kind = cpu_kind()
    assert kind.endswith(f": {PRECISION}") and f"{os.cpu_count()} cores" in kind
