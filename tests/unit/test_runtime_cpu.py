"""Native-bf16 detection from /proc/cpuinfo (monkeypatched: this machine has AMX) and the one-line warning."""

from __future__ import annotations

import io

import pytest
import torch

from iddpm.runtime import cpu
from iddpm.runtime.cpu import cpu_flags, matmul_gflops, native_bf16, slow_bf16_message, warn_if_slow_bf16
from iddpm.train.precision import Precision

SAPPHIRE_RAPIDS = ("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                   "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
EPYC_ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma sha_ni\n\nprocessor\t: 1\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd atomics\n"


def measured(fp32: float, bf16: float):
    """A stand-in for :func:`matmul_gflops` returning fixed throughputs (and counting the calls)."""
    calls = []

    def measure(dtype):
        calls.append(dtype)
        return fp32 if dtype == torch.float32 else bf16

    measure.calls = calls
    return measure


def test_cpu_flags_parsing():
    assert "amx_bf16" in cpu_flags(SAPPHIRE_RAPIDS) and "avx2" in cpu_flags(EPYC_ZEN3)
    assert "bf16" in cpu_flags(GRAVITON3)
    assert cpu_flags("model name : something\n") is None


@pytest.mark.parametrize("text,machine,expected", [
    (SAPPHIRE_RAPIDS, "x86_64", True),
    (EPYC_ZEN3, "x86_64", False),
    (EPYC_ZEN3.replace("sha_ni", "avx512_bf16"), "AMD64", True),  # Zen 4
    (GRAVITON3, "aarch64", True),
    (GRAVITON2, "aarch64", False),
    ("no flags here", "x86_64", None),
    (SAPPHIRE_RAPIDS, "riscv64", None),
])
def test_native_bf16(text, machine, expected):
    assert native_bf16(text, machine) is expected


def test_native_cpu_is_trusted_without_timing():
    measure = measured(169.0, 1.0)
    assert slow_bf16_message(SAPPHIRE_RAPIDS, "x86_64", measure=measure) is None
    assert measure.calls == []


def test_cpu_without_bf16_flags_warns_with_the_measured_fact():
    msg = slow_bf16_message(EPYC_ZEN3, "x86_64", measure=measured(169.0, 1.0))
    assert msg.startswith("--precision bf16: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16 in")
    assert "1.0 GFLOP/s vs 169 in float32 (169x slower)" in msg and msg.endswith("use --precision fp32 on this CPU")
    assert "\n" not in msg


def test_honest_fallback_when_timing_disagrees_or_flags_are_unknown():
    assert slow_bf16_message(EPYC_ZEN3, "x86_64", measure=measured(100.0, 60.0)) is None  # emulation is fast enough
    msg = slow_bf16_message("", "x86_64", measure=measured(100.0, 2.0))  # no flags to read: the timing decides
    assert "its flags could not be read" in msg and "50x slower" in msg
    assert slow_bf16_message("", "", measure=measured(100.0, 300.0)) is None


def test_warning_only_for_bf16_on_cpu():
    stream = io.StringIO()
    say = lambda: "--precision bf16: slow here; use --precision fp32 on this CPU"  # noqa: E731
    assert warn_if_slow_bf16("fp32", "cpu", stream=stream, message=say) is None
    assert warn_if_slow_bf16("bf16", "meta", stream=stream, message=say) is None
    assert stream.getvalue() == ""
    assert warn_if_slow_bf16("bf16", torch.device("cpu"), stream=stream, message=say) == say()
    assert stream.getvalue() == f"iddpm: warning: {say()}\n"


def test_precision_policy_warns_once_per_run(tmp_path, monkeypatch, capsys):
    """The training path: Precision("bf16", cpu) -- built once per run by the trainer -- prints the one line."""
    fake = tmp_path / "cpuinfo"
    fake.write_text(EPYC_ZEN3)
    monkeypatch.setattr(cpu, "CPUINFO", fake)
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "matmul_gflops", lambda dtype: 169.0 if dtype == torch.float32 else 1.0)
    Precision("bf16", torch.device("cpu"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iddpm: warning: --precision bf16") and "169x slower" in err[0]
    Precision("fp32", torch.device("cpu"))
    assert capsys.readouterr().err == ""


def test_this_machine_reads_its_own_flags():
    """On the real /proc/cpuinfo (where there is one) detection answers without error; the timing is sane."""
    assert native_bf16() in (True, False, None)
    threads = torch.get_num_threads()
    assert matmul_gflops(torch.float32, n=64, reps=1) > 0
    assert torch.get_num_threads() == threads  # the single-thread timing restores the thread count
