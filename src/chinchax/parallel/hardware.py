"""The devices a run can be planned for: memory, dense peak FLOP/s and bandwidths per device, each with its source.

One table, used by the mesh presets (what a preset's chips hold), the memory plan (what fits), MFU (the peak)
and the performance model (chinchax.parallel.perf_model: the bandwidths). Memory is what the device offers a
process (HBM, or on a Cerebras CS-2 the wafer's SRAM, where only activations live: weights and optimizer state
stay in MemoryX and stream in). Peaks are dense bf16, the figure MFU is quoted against; a CPU's peak is
measured on the machine at hand. Bandwidths are bytes/s per device: memory (HBM, or the wafer's SRAM), and one
link within a host and one across hosts, each per direction (what a ring collective's step sends while it
receives as much). A CPU's memory bandwidth is measured on the machine at hand (measure_memory_bandwidth, in
the run that uses it: benchmarks/perf_model_cpu.py); it has no links.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import resource
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from chinchax import atomic, data

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """One accelerator (or host) model."""

    name: str
    platform: str  # 'gpu', 'tpu', 'cs2' or 'cpu' (also the Ray resource family of a sweep point)
    memory_bytes: int | None  # per device; None: read from the machine (CPU host RAM)
    peak_flops: float | None  # dense bf16 FLOP/s (a CS-2: fp16); None: measured (CPU)
    holds_state: bool  # False: params and optimizer state stream from elsewhere (Cerebras MemoryX)
    kind_match: str  # substring of jax's `device_kind` that identifies it
    source: str
    devices_per_host: int | None = None  # in a multi-host pod (8 GPUs per node, 4 TPU chips per host)
    memory_bandwidth: float | None = None  # bytes/s per device (HBM; on a CS-2 the wafer's SRAM)
    intra_host_link: tuple[str, float] | None = None  # (name, bytes/s per device per direction) within a host
    inter_host_link: tuple[str, float] | None = None  # (name, bytes/s per device per direction) across hosts
    bandwidth_source: str = ""


# fmt: off
IB_NDR = ("InfiniBand NDR (ConnectX-7, 400 Gb/s per GPU)", 50e9)
DGX_H100 = ("NVIDIA DGX H100/H200 user guide: 8 × ConnectX-7 400 Gb/s InfiniBand NDR for the compute fabric, "
            "one per GPU")
DEVICES: dict[str, Device] = {  # by_kind takes the first match: the more specific names come first
    "h100-pcie": Device("NVIDIA H100 PCIe 80 GB", "gpu", 80 * GiB, 756e12, True, "H100 PCIe",
                        "NVIDIA H100 Tensor Core GPU datasheet: 80 GB HBM2e, 756 TFLOP/s dense BF16 (PCIe)", devices_per_host=8,
                        memory_bandwidth=2.0e12, intra_host_link=("PCIe Gen5 x16", 64e9), inter_host_link=IB_NDR,
                        bandwidth_source="NVIDIA H100 datasheet (PCIe): 2 TB/s HBM2e, PCIe Gen5 128 GB/s both ways "
                        "(NVLink bridges join pairs only, so 8 GPUs talk over PCIe); " + DGX_H100),
    "h100": Device("NVIDIA H100 SXM5 80 GB", "gpu", 80 * GiB, 989.4e12, True, "H100",
                   "NVIDIA H100 Tensor Core GPU datasheet: 80 GB HBM3, 989.4 TFLOP/s dense BF16 (SXM5)", devices_per_host=8,
                   memory_bandwidth=3.35e12, intra_host_link=("NVLink 4", 450e9), inter_host_link=IB_NDR,
                   bandwidth_source="NVIDIA H100 datasheet (SXM): 3.35 TB/s HBM3, NVLink 900 GB/s both ways; "
                   + DGX_H100),
    "h200": Device("NVIDIA H200 SXM 141 GB", "gpu", 141 * 10**9, 989.4e12, True, "H200",
                   "NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 989 TFLOP/s dense BF16", devices_per_host=8,
                   memory_bandwidth=4.8e12, intra_host_link=("NVLink 4", 450e9), inter_host_link=IB_NDR,
                   bandwidth_source="NVIDIA H200 datasheet (SXM): 4.8 TB/s HBM3e, NVLink 900 GB/s both ways; "
                   + DGX_H100),
    "a100": Device("NVIDIA A100 SXM4 80 GB", "gpu", 80 * GiB, 312e12, True, "A100",
                   "NVIDIA A100 Tensor Core GPU datasheet: 80 GB HBM2e, 312 TFLOP/s dense BF16", devices_per_host=8,
                   memory_bandwidth=2.039e12, intra_host_link=("NVLink 3", 300e9),
                   inter_host_link=("InfiniBand HDR (ConnectX-6, 200 Gb/s per GPU)", 25e9),
                   bandwidth_source="NVIDIA A100 datasheet (80 GB SXM): 2,039 GB/s HBM2e, NVLink 600 GB/s both "
                   "ways; NVIDIA DGX A100 user guide: 8 × ConnectX-6 200 Gb/s HDR InfiniBand, one per GPU"),
    "tpu-v5e": Device("Google TPU v5e", "tpu", 16 * GiB, 197e12, True, "TPU v5 lite",
                      "Google Cloud TPU v5e documentation: 16 GiB HBM2 per chip, 197 TFLOP/s BF16", devices_per_host=4,
                      memory_bandwidth=819e9, intra_host_link=("ICI", 200e9), inter_host_link=("ICI", 200e9),
                      bandwidth_source="Google Cloud TPU v5e documentation: 819 GB/s HBM2, inter-chip "
                      "interconnect 1,600 Gbps per chip (a slice's hosts share the ICI torus)"),
    "tpu-v5p": Device("Google TPU v5p", "tpu", 95 * GiB, 459e12, True, "TPU v5p",
                      "Google Cloud TPU v5p documentation: 95 GiB HBM2e per chip, 459 TFLOP/s BF16", devices_per_host=4,
                      memory_bandwidth=2765e9, intra_host_link=("ICI", 600e9), inter_host_link=("ICI", 600e9),
                      bandwidth_source="Google Cloud TPU v5p documentation: 2,765 GB/s HBM2e, inter-chip "
                      "interconnect 4,800 Gbps per chip (1,200 GB/s bidirectional)"),
    "tpu-v4": Device("Google TPU v4", "tpu", 32 * GiB, 275e12, True, "TPU v4",
                     "Google Cloud TPU v4 documentation: 32 GiB HBM2 per chip, 275 TFLOP/s BF16", devices_per_host=4,
                     memory_bandwidth=1200e9, intra_host_link=("ICI", 300e9), inter_host_link=("ICI", 300e9),
                     bandwidth_source="Google Cloud TPU v4 documentation: 1,200 GB/s HBM2; Google Cloud TPU v5p "
                     "announcement (Dec 2023), v4 column: inter-chip interconnect 2,400 Gbps per chip"),
    "cs2": Device("Cerebras CS-2 (WSE-2)", "cs2", 40 * 10**9, 7.5e15, False, "CS-2",
                  "Cerebras CS-2 datasheet: 40 GB on-wafer SRAM; weight streaming keeps weights and "
                  "optimizer state in MemoryX (Cerebras-GPT, Dey et al. 2023, Sec. 3); peak: Cerebras' "
                  "Andromeda announcement (SC22, 14 Nov 2022, as Tom's Hardware and EnterpriseAI report it): "
                  "16 CS-2 give 120 PFLOP/s dense FP16, 7.5 PFLOP/s each",
                  memory_bandwidth=20e15, inter_host_link=("MemoryX → SwarmX → wafer (12 × 100 GbE)", 150e9),
                  bandwidth_source="Cerebras CS-2 datasheet: 20 PB/s on-wafer memory bandwidth, system I/O "
                  "12 × 100 Gigabit Ethernet (1.2 Tb/s); Cerebras weight-streaming white paper: weights "
                  "stream in from MemoryX and gradients reduce out through SwarmX over these links"),
    "cpu": Device("host CPU", "cpu", None, None, True, "cpu",
                  "this machine: available RAM (or ulimit -v) split over its local devices; peak measured",
                  bandwidth_source="this machine: memory bandwidth measured (measure_memory_bandwidth: a jitted "
                  "elementwise pass over 256 MiB of fp32 into fresh, or reused, buffers; bytes read and written "
                  "over the best of three median times)"),
}
# fmt: on


def by_kind(device_kind: str) -> Device | None:
    """The table's device whose `kind_match` occurs in jax's `device_kind` (e.g. 'NVIDIA H100 80GB HBM3')."""
    return next(
        (d for d in DEVICES.values() if d.platform != "cpu" and d.kind_match.lower() in device_kind.lower()),
        None,
    )


def host_memory_per_device(local_devices: int) -> int:
    """The host's available RAM, or this process's address-space limit (`ulimit -v`) when lower, over its local
    (fake CPU) devices, in bytes."""
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    memory = int(fields["MemAvailable"].split()[0]) * 1024
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        memory = min(memory, limit)
    return memory // max(1, local_devices)


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` jitted fp32 size×size matmuls on the default device."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure_dot_seconds(
    lhs: tuple[int, ...], rhs: tuple[int, ...], dimension_numbers, repeats: int = 5, loop_flops: float = 2e8
) -> float:
    """Seconds one fp32 `jax.lax.dot_general(lhs, rhs, dimension_numbers)` of these operand dims takes on the
    default device: the median of `repeats` timed calls of the jitted matmul. A matmul of fewer than
    `loop_flops` FLOPs is timed as a jitted loop of enough of them to make that many (each iteration writes one
    element of the previous product into its lhs, so none can be skipped), per iteration, so that the call's
    dispatch does not count."""
    (_, contracting), (_, batch) = dimension_numbers
    flops = 2.0 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in contracting + batch)
    iterations = max(1, min(1000, int(loop_flops // flops)))
    first = (0,) * len(lhs)

    def loop(a, b):
        def body(_, a):
            return a.at[first].set(1e-3 * jax.lax.dot_general(a, b, dimension_numbers).reshape(-1)[0])

        return jax.lax.fori_loop(0, iterations, body, a)

    call = jax.jit(loop if iterations > 1 else lambda a, b: jax.lax.dot_general(a, b, dimension_numbers))
    rng = np.random.default_rng(0)  # numpy, not jax.random: that compiles a sampler for every new shape
    a, b = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in (lhs, rhs))
    call(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / iterations


def measure_memory_bandwidth(
    elements: int = 2**26, repeats: int = 9, reuse: bool = False, rounds: int = 3
) -> float:
    """Bytes/s of a jitted fp32 y = a·x + b over `elements` (default 256 MiB, far larger than a CPU's caches) on
    the default device: bytes read plus written over the median of `repeats` runs, after as many untimed ones
    (under chinchax.malloc's kept memory the first few outputs still grow the heap, page faults and all, as a
    run's first steps do); the best of `rounds` such medians, since a neighbour on a shared machine can slow a
    round by half and never speeds one. Each run writes a freshly allocated output, as a step's kernels write
    the buffers it allocates per run; with `reuse` the input is donated, so each run writes into the buffer the
    previous run wrote, as a loop body's kernels do from its second iteration on."""
    x = jnp.ones((elements,), jnp.float32)
    axpb = jax.jit(lambda v: 1.0001 * v + 1.0, donate_argnums=(0,) if reuse else ())
    medians = []
    for _ in range(rounds):
        times = []
        # untimed: the compile, then as many runs as the allocator takes to settle
        for run in range(2 * repeats + 1):
            start = time.perf_counter()
            y = axpb(x).block_until_ready()
            if run > repeats:
                times.append(time.perf_counter() - start)
            x = y if reuse else x
        medians.append(statistics.median(times))
    return 2 * 4 * elements / min(medians)


def _machine() -> str:
    """This machine as a cache key: host name, CPU model, device kind, jax version."""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{platform.node()} | {model} | {jax.devices()[0].device_kind} | jax {jax.__version__}"


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
    """(FLOP/s, where it came from): configured, else the device table, else measured on this machine once and
    kept in the chinchax cache (peak_flops.json), so runs and sweep points do not measure it again."""
    if configured > 0:
        return configured, "configured"
    kind = jax.devices()[0].device_kind
    device = by_kind(kind)
    if device is not None and device.peak_flops:
        return device.peak_flops, f"table ({device.source})"
    value, path = _measured_once("peak_flops.json", measure_matmul_peak)
    return value, f"measured fp32 matmul ({kind}; cached in {path})"


def _measured_once(name: str, measure: Callable[[], float]) -> tuple[float, pathlib.Path]:
    """(measure() for this machine, the cache file): read from the chinchax cache's `name`, else measured
    now and kept there."""
    path = data.default_cache_dir() / name
    measured, machine = (json.loads(path.read_text()) if path.is_file() else {}), _machine()
    if machine not in measured:
        measured[machine] = measure()
        atomic.write_json(path, measured)
    return measured[machine], path
