"""The performance model: the collectives of a compiled step per mesh axis, its memory traffic, a roofline step time.

`collective_bytes` reads a compiled, SPMD-partitioned HLO module (`compiled.as_text()`) and gives, per device
and per step, the bytes each kind of collective moves over each mesh axis (or set of axes), keyed
'<kind> on <axes>' (e.g. 'all-gather on fsdp', 'all-reduce on fsdp+tensor'). An async pair (-start / -done)
counts once. Bytes follow the ring conventions (NCCL's "bus bandwidth"): with g devices in a group and an
output of B bytes, all-gather and all-to-all move B·(g−1)/g, reduce-scatter B·(g−1), all-reduce 2·B·(g−1)/g,
collective-permute B. A collective's replica groups are matched to the mesh axes whose device groups hold
them (devices numbered as `mesh.devices.flat`, which is how jit assigns them). Loop bodies count trip-count
times through `hlo_loop_totals`, the walk chinchax.dryrun.aot also counts matmul FLOPs with.

`memory_traffic` estimates the bytes one device moves to and from its memory per step, analytically (XLA's
cost analysis counts a scanned layer once, and the CPU compile of a dry run fuses differently from a GPU's):
the optimizer reads fp32 params, gradients and both Adam moments and writes params and moments (7 × 4 bytes per
parameter shard element; none on a weight-streaming device, whose optimizer runs in MemoryX); with several
microbatches the gradient accumulator is read and written per microbatch; per microbatch every gathered weight
(memory_plan.gathered_elements: the real shapes, whatever the block's switches) is read in the compute dtype by
the forward, input-gradient and weight-gradient matmuls (and once more when remat 'full' recomputes the forward)
and its fp32 gradient written once, but for an untied model's token embedding, which is only looked up (rows, not
counted) and its gradient written; every activation of the memory plan's working set
(chinchax.parallel.memory_plan.activation_bytes, all layers, no remat) and the fp32 logits and their gradient are
written once and read twice (by their consumer and by the backward pass), and what remat drops is written and
read once more when recomputed. Kernels that read an array more often than that (unfused
elementwise chains) move more, so the estimate errs low.

`predict` turns per-device FLOPs, bytes accessed and collective bytes into a step time on a device of
chinchax.parallel.hardware: compute = FLOPs / peak FLOP/s, memory = bytes / memory bandwidth, each collective
= bytes / the bandwidth of its axis's link. Overlap assumption (conservative): compute and memory traffic
overlap each other, collectives overlap nothing, so step = max(compute, memory) + Σ collectives.

On a CPU (one device, no collectives) the step is predicted kernel by kernel instead (`predict_kernels`): XLA:CPU
runs the kernels of a compiled module one after another, each a fusion, a matmul or a lone op. So each kernel
takes the roofline time of its own work, max(the time of its matmuls, the bytes it reads and writes / memory
bandwidth), and the step is their sum. `hlo_kernels` reads the kernels from the compiled HLO (how often each
runs: the trip counts of the loops around it; bytes: its operands and result; its matmuls as `Dot`s: operand
dims and dimension numbers). A matmul's time is measured on the machine, each distinct Dot once by itself
(hardware.measure_dot_seconds): the small and oddly shaped matmuls of a small model run far below the fp32 peak
(a 64-wide layer's at a third of it), so FLOPs / peak would err low by up to half. The bandwidth depends on
where a kernel writes: a kernel's first run in a step writes buffers allocated for this run, at the bandwidth
of an elementwise pass into a fresh buffer, while a loop body (microbatches, blockwise attention) writes from
its second iteration on into buffers it already wrote, at the bandwidth of a pass into a reused buffer:
step = Σ_kernels max(matmuls, bytes / fresh) + (runs − 1) · max(matmuls, bytes / reused).
Both bandwidths are measured too (chinchax.parallel.hardware); nothing is fitted to step times. What the model
leaves out: the gaps between kernels, kernels XLA runs side by side on the cores, and caches: the bandwidth is
that of a 256 MiB pass, while most of a small model's kernels touch a few MiB. On a shared machine that pass
swings from process to process (45–85 GB/s into fresh buffers on a 2-core VM), and the steps by ±15%, not
together; benchmarks.perf_model_cpu compares medians over fresh processes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np

from chinchax.parallel import hardware, memory_plan, mesh

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \((.*)\) -> .* \{$")
_PARAM = re.compile(r"(\S+): \w+\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_ARRAY_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")
_CALLEE = re.compile(r"(?:calls|body|to_apply|branch_computations)=\{?%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_ARRAYS = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# measure(result name, result shape text, opcode, operands and attributes text, {name: dims} so far) → amounts
Measure = Callable[[str, str, str, str, dict[str, tuple[int, ...]]], dict[str, float]]


def dims(text: str) -> tuple[int, ...]:
    """'8,64' → (8, 64)."""
    return tuple(int(d) for d in text.split(",") if d)


# (result name, result shape text, opcode, operands and attributes text)
Instruction = tuple[str, str, str, str]


@dataclasses.dataclass(frozen=True)
class HloModule:
    """A compiled module's text, split into its computations."""

    entry: str
    body: dict[str, list[Instruction]]  # computation: its instructions in order
    roots: dict[str, Instruction]  # computation: its ROOT instruction
    params: dict[str, dict[str, tuple[int, ...]]]  # computation: the dims its header gives each parameter


def parse_hlo(hlo_text: str) -> HloModule:
    """Split `compiled.as_text()` into computations (the one walk both hlo_loop_totals and hlo_kernels read)."""
    body, roots, params, entry, name = {}, {}, {}, None, None
    for line in hlo_text.splitlines():
        if match := _COMPUTATION.match(line):
            name = match.group(1)
            entry = name if line.startswith("ENTRY") else entry
            body[name] = []
            params[name] = {p: dims(d) for p, d in _PARAM.findall(match.group(2))}
        elif name is not None and (match := _INSTRUCTION.match(line)):
            body[name].append(match.groups())
            if line.lstrip().startswith("ROOT "):
                roots[name] = match.groups()
    return HloModule(entry, body, roots, params)


def hlo_loop_totals(hlo_text: str, measure: Measure) -> dict[str, float]:
    """Σ measure(...) over the instructions the entry computation runs: a called computation (fusion, call,
    reducer, branch) counts once per call, a while body `known_trip_count` times (once when XLA does not know
    the count)."""
    module = parse_hlo(hlo_text)
    own: dict[str, dict[str, float]] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    for name, instructions in module.body.items():
        own[name], calls[name] = {}, []
        shapes = dict(module.params[name])
        for result, shape, opcode, rest in instructions:
            if array := _ARRAY_SHAPE.match(shape):
                shapes[result] = dims(array.group(1))
            for key, amount in measure(result, shape, opcode, rest, shapes).items():
                own[name][key] = own[name].get(key, 0.0) + amount
            trips = _TRIP_COUNT.search(rest)
            for callee in _CALLEE.findall(rest):
                calls[name].append((callee, int(trips.group(1)) if opcode == "while" and trips else 1))

    totals: dict[str, dict[str, float]] = {}

    def total(computation: str) -> dict[str, float]:
        if computation not in totals:
            summed = dict(own.get(computation, {}))
            for callee, times in calls.get(computation, []):
                for key, amount in total(callee).items():
                    summed[key] = summed.get(key, 0.0) + times * amount
            totals[computation] = summed
        return totals[computation]

    return total(module.entry)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape, a tuple's arrays summed: '(f32[64]{0}, bf16[2,8])' → 256 + 32 (pred: 1 byte;
    the bits of any other type are the first number in its name: s32, bf16, f8e4m3fn)."""
    total = 0
    for dtype, sizes in _ARRAYS.findall(shape):
        bits = re.search(r"\d+", dtype)
        itemsize = 1 if dtype == "pred" else int(bits.group()) // 8 if bits else 0
        total += math.prod(dims(sizes)) * itemsize
    return total


def replica_groups(rest: str, devices: int) -> list[tuple[int, ...]]:
    """The device groups of a collective's attributes, in any of HLO's spellings: explicit {{0,1},{2,3}},
    iota [2,4]<=[4,2]T(1,0), mesh['a'=2,'b'=4] {'b'} (optionally with device_ids=([4,2]T(1,0)): the devices
    in the mesh's positions, in iota form), collective-permute's source_target_pairs, or none (all devices)."""
    mesh_groups = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:<=\[([\d,]+)\])?(?:T\(([\d,]+)\))?\))?"
        r" \{([^}]*)\}",
        rest,
    )
    if mesh_groups:
        sizes = {axis: int(size) for axis, size in re.findall(r"'(\w+)'=(\d+)", mesh_groups.group(1))}
        grouped = tuple(re.findall(r"'(\w+)'", mesh_groups.group(5)))
        ids = (
            _iota(*mesh_groups.group(2, 3, 4))
            if mesh_groups.group(2)
            else np.arange(math.prod(sizes.values()))
        )
        return [tuple(sorted(int(ids[p]) for p in group)) for group in axis_groups(sizes, grouped)]
    if match := re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest):
        ids = _iota(match.group(2), None, match.group(3))
        return [tuple(g) for g in ids.reshape(dims(match.group(1))).tolist()]
    if match := re.search(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}", rest):
        groups = [dims(g) for g in re.findall(r"\{([\d,]*)\}", match.group(1))]
        if groups:
            return groups
    return [tuple(range(devices))]


def _iota(shape: str, reshape: str | None, permutation: str | None) -> np.ndarray:
    """The device ids of HLO's iota form [shape]<=[reshape]T(permutation), flat: 0..n−1 laid out as reshape
    (or shape when there is none), transposed by the permutation."""
    ids = np.arange(math.prod(dims(reshape or shape))).reshape(dims(reshape or shape))
    return (ids.transpose(dims(permutation)) if permutation else ids).reshape(-1)


def axis_groups(mesh_shape: dict[str, int], axes: tuple[str, ...]) -> list[frozenset[int]]:
    """The device groups (positions in mesh.devices.flat) within which only `axes` vary."""
    names = list(mesh_shape)
    ids = np.arange(math.prod(mesh_shape.values())).reshape(tuple(mesh_shape.values()))
    moved = np.moveaxis(ids, [names.index(a) for a in axes], range(len(names) - len(axes), len(names)))
    return [frozenset(g) for g in moved.reshape(-1, math.prod(mesh_shape[a] for a in axes)).tolist()]


def attribute(groups: list[tuple[int, ...]], mesh_shape: dict[str, int]) -> str:
    """The smallest set of (non-trivial) mesh axes whose device groups hold every group: 'fsdp', 'fsdp+tensor'."""
    live = [a for a, size in mesh_shape.items() if size > 1]
    for count in range(1, len(live) + 1):
        for axes in itertools.combinations(live, count):
            within = axis_groups(mesh_shape, axes)
            if all(any(set(g) <= w for w in within) for g in groups):
                return "+".join(axes)
    raise ValueError(f"replica groups {groups} span devices outside the mesh {mesh_shape}")


def _moved(kind: str, out_bytes: int, group: int) -> float:
    """Bytes one device sends for a collective of `group` devices with an output of `out_bytes`."""
    if kind == "collective-permute":
        return float(out_bytes)
    if group <= 1:
        return 0.0
    share = {"all-gather": 1, "all-to-all": 1, "all-reduce": 2, "reduce-scatter": group}[kind]
    return share * out_bytes * (group - 1) / group


def collective_bytes(hlo_text: str, mesh_shape: dict[str, int]) -> dict[str, float]:
    """{'<kind> on <axes>': bytes per device per step} of every collective in a compiled SPMD module on a mesh
    of these axis sizes ({'data': d, 'fsdp': f, 'tensor': t}), loops counted trip-count times."""
    devices = math.prod(mesh_shape.values())
    started: dict[str, tuple[str, list[tuple[int, ...]]]] = {}

    def measure(result, shape, opcode, rest, shapes) -> dict[str, float]:
        kind = opcode.removesuffix("-start").removesuffix("-done")
        if kind not in COLLECTIVES:
            return {}
        if opcode.endswith("-start"):  # counted at its -done, whose shape is the output alone
            started[result] = (kind, replica_groups(rest, devices))
            return {}
        if opcode.endswith("-done"):
            kind, groups = started[rest.split(")")[0].strip().lstrip("%")]
        else:
            groups = replica_groups(rest, devices)
        if len({device for group in groups for device in group}) <= 1:
            return {}  # nothing leaves the device (a one-device mesh)
        moved = _moved(kind, shape_bytes(shape), len(groups[0]))
        return {f"{kind} on {attribute(groups, mesh_shape)}": moved} if moved else {}

    return hlo_loop_totals(hlo_text, measure)


def memory_traffic(
    cfg: ml_collections.ConfigDict, sizes: dict[str, int], device: hardware.Device
) -> dict[str, float]:
    """{what moves them: bytes} one device reads and writes in its memory per train step (the module docstring's
    estimate), for cfg with concrete microbatches and remat on a mesh of these axis sizes; 'total' sums them."""
    m, fp32 = cfg.model, 4
    width = jnp.dtype(m.compute_dtype).itemsize
    microbatches = cfg.train.microbatches
    shards = sizes["data"] * sizes["fsdp"]
    sequences = -(-(cfg.train.batch_size // microbatches) // shards)  # per device, padded as training pads
    shard = memory_plan.param_shard_elements(cfg, sizes)
    gathered = memory_plan.gathered_elements(cfg, sizes["tensor"])
    multiplied = m.n_layers * gathered.block + gathered.outside  # every element a matmul reads
    every = memory_plan.activation_bytes(cfg, sequences, sizes["tensor"], "none")
    kept = memory_plan.activation_bytes(cfg, sequences, sizes["tensor"], m.remat)
    if m.remat != "none":  # activation_bytes adds one block's working set to what remat keeps
        kept -= every // m.n_layers
    split = 1 if "vocab" in mesh.preset(cfg.mesh.preset).replicated else sizes["tensor"]
    weight_reads = 4 if m.remat == "full" else 3
    traffic = {
        "optimizer": 7 * fp32 * shard if device.holds_state else 0,
        "gradient_accumulation": 2 * fp32 * shard * microbatches if microbatches > 1 else 0,
        "weights": microbatches * (multiplied * (weight_reads * width + fp32) + gathered.lookup * fp32),
        "activations": microbatches * (3 * every + 2 * max(0, every - kept)),
        "logits": microbatches * 3 * 2 * sequences * cfg.data.seq_len * m.vocab_size / split * fp32,
    }
    return {**{k: float(v) for k, v in traffic.items()}, "total": float(sum(traffic.values()))}


def axis_links(device: hardware.Device, mesh_shape: dict[str, int]) -> dict[str, tuple[str, float]]:
    """{axis: (link name, bytes/s per device)}. Devices are numbered host by host and the mesh is laid out
    (data, fsdp, tensor) with the last axis fastest, so an axis stays within a host when its size times the
    sizes of the axes after it fits in `devices_per_host`; a device without hosts (CS-2) uses its inter-host
    link for every axis."""
    links, inner = {}, 1
    for axis in reversed(list(mesh_shape)):
        inner *= mesh_shape[axis]
        within = device.devices_per_host is not None and inner <= device.devices_per_host
        link = device.intra_host_link if within else device.inter_host_link
        if link is None:
            raise ValueError(
                f"the device table has no {'intra' if within else 'inter'}-host link for {device.name}"
            )
        links[axis] = link
    return links


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A roofline step time and what follows from it."""

    seconds: float  # predicted step time
    bound: str  # the longest term: 'compute', 'memory' or '<kind> on <axes>'
    compute_seconds: float  # per-device FLOPs / peak FLOP/s
    memory_seconds: float  # per-device bytes accessed / memory bandwidth
    collective_seconds: dict[str, float]  # '<kind> on <axes>' → bytes / that axis's link bandwidth
    mfu: float  # model FLOPs per step / (seconds · devices · peak)
    tokens_per_second: float


def predict(
    device: hardware.Device,
    mesh_shape: dict[str, int],
    flops: float,
    bytes_accessed: float,
    collectives: dict[str, float],
    tokens_per_step: int,
    model_flops_per_step: float,
    peak_flops: float | None = None,
) -> Prediction:
    """The step time of a step that does, per device, `flops` FLOPs, `bytes_accessed` bytes of memory traffic
    and `collectives` ({'<kind> on <axes>': bytes}, as `collective_bytes` gives), on `device` laid out as
    `mesh_shape`: max(compute, memory) + Σ collectives (collectives overlap nothing). A collective over
    several axes runs at the slowest of their links. peak_flops (FLOP/s per device) defaults to the table's;
    model_flops_per_step is the analytic count over all devices, the numerator of MFU."""
    peak = peak_flops or device.peak_flops
    if not peak or not device.memory_bandwidth:
        raise ValueError(f"the device table has no peak FLOP/s or memory bandwidth for {device.name}")
    links = axis_links(device, mesh_shape)
    compute, memory = flops / peak, bytes_accessed / device.memory_bandwidth
    comms = {
        name: moved / min(links[axis][1] for axis in name.split(" on ")[1].split("+"))
        for name, moved in collectives.items()
    }
    seconds = max(compute, memory) + sum(comms.values())
    terms = {"compute": compute, "memory": memory, **comms}
    devices = math.prod(mesh_shape.values())
    return Prediction(
        seconds=seconds,
        bound=max(terms, key=terms.get),
        compute_seconds=compute,
        memory_seconds=memory,
        collective_seconds=comms,
        mfu=model_flops_per_step / (seconds * devices * peak),
        tokens_per_second=tokens_per_step / seconds,
    )


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of a compiled module, as `hlo_kernels` reads it."""

    name: str  # the HLO instruction
    opcode: str  # 'fusion', 'dot', 'copy', ...
    runs: int  # times a step runs it (the trip counts of the loops around it)
    bytes: float  # bytes read and written per run
    dots: tuple[Dot, ...] = ()  # the matmuls it holds

    @property
    def flops(self) -> float:
        """Matmul FLOPs per run (2 · output · contraction of each dot it holds)."""
        return sum(dot.flops for dot in self.dots)


@dataclasses.dataclass(frozen=True)
class Dot:
    """One matmul of a compiled module: its operands' dims and its dimension numbers as `jax.lax.dot_general`
    takes them, ((lhs contracting, rhs contracting), (lhs batch, rhs batch))."""

    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    dimension_numbers: tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def flops(self) -> float:
        """2 · output elements · contraction size."""
        return 2.0 * math.prod(self.lhs) * math.prod(self.rhs[i] for i in self._rhs_free)

    @property
    def largest_array_bytes(self) -> float:
        """fp32 bytes of the largest of its operands and its output."""
        (_, rhs_contracting), _ = self.dimension_numbers
        output = self.flops / 2 / math.prod(self.rhs[i] for i in rhs_contracting)
        return 4.0 * max(math.prod(self.lhs), math.prod(self.rhs), output)

    @property
    def _rhs_free(self) -> list[int]:
        (_, rhs_contracting), (_, rhs_batch) = self.dimension_numbers
        return [i for i in range(len(self.rhs)) if i not in rhs_contracting + rhs_batch]

    def bounded(self, max_flops: float, max_bytes: float) -> Dot:
        """This matmul with its largest dim halved (rounded up) until it makes at most `max_flops` FLOPs and no
        operand or output holds more than `max_bytes` fp32 bytes: a slice that runs anywhere in bounded time and
        memory, whose time scales back up by FLOPs (a matmul that large runs at the machine's matmul rate). A
        contracting or batch dim is halved in both operands."""
        (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = self.dimension_numbers
        partner = dict(zip(lhs_contracting + lhs_batch, rhs_contracting + rhs_batch, strict=True))
        dot = self
        while dot.flops > max_flops or dot.largest_array_bytes > max_bytes:
            lhs, rhs = list(dot.lhs), list(dot.rhs)
            places = [(lhs, i) for i in range(len(lhs))] + [(rhs, i) for i in dot._rhs_free]
            dims, i = max(places, key=lambda place: place[0][place[1]])
            dims[i] = -(-dims[i] // 2)
            if dims is lhs and i in partner:
                rhs[partner[i]] = lhs[i]
            dot = Dot(tuple(lhs), tuple(rhs), self.dimension_numbers)
        return dot


# instructions that launch nothing and move nothing, and those whose callees run as kernels of their own
_NO_KERNEL = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all")
_CONTROL = ("while", "call", "conditional")


def dot_of(rest: str, shapes: dict[str, tuple[int, ...]]) -> Dot:
    """The Dot of a dot instruction's operands-and-attributes text."""

    def numbers(name: str) -> tuple[int, ...]:
        found = re.search(name + r"=\{([\d,]*)\}", rest)
        return dims(found.group(1)) if found else ()

    lhs, rhs = _operands(rest)[:2]
    contracting = (numbers("lhs_contracting_dims"), numbers("rhs_contracting_dims"))
    return Dot(
        shapes[lhs], shapes[rhs], (contracting, (numbers("lhs_batch_dims"), numbers("rhs_batch_dims")))
    )


def _operands(rest: str) -> list[str]:
    """The operand names of an instruction's operands-and-attributes text."""
    return re.findall(r"%([\w.\-]+)", rest.split(")")[0])


# ops that update their first operand in place and write only their update (the operand index of the update)
_IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}


def hlo_kernels(hlo_text: str) -> list[Kernel]:
    """The kernels a compiled (unpartitioned) module runs: each instruction of the entry computation and of the
    while bodies, calls and branches it reaches, but for the bookkeeping ones (parameter, constant, tuple,
    get-tuple-element, bitcast). A fusion is one kernel holding the matmul FLOPs of the dots inside it.

    Bytes are those of a kernel's operands and result, except where it touches less: an operand that a fusion
    only dynamic-slices is read slice by slice (their sizes), and a dynamic-update-slice or scatter (alone or
    as a fusion's root) updates its buffer in place, reading and writing only the update."""
    module = parse_hlo(hlo_text)
    body, roots = module.body, module.roots
    sizes, shapes = {}, {}
    for computation, instructions in body.items():
        shapes.update(module.params[computation])
        for result, shape, _, _ in instructions:
            sizes[result] = shape_bytes(shape)
            if array := _ARRAY_SHAPE.match(shape):
                shapes[result] = dims(array.group(1))

    def fused_dots(computation: str) -> list[Dot]:
        return [dot_of(rest, shapes) for _, _, opcode, rest in body[computation] if opcode == "dot"] + [
            dot
            for *_, rest in body[computation]
            for callee in _CALLEE.findall(rest)
            for dot in fused_dots(callee)
        ]

    def moved(result: str, opcode: str, rest: str) -> float:
        """Bytes a kernel reads and writes."""
        operands = _operands(rest)
        read = [sizes.get(operand, 0) for operand in operands]
        written = sizes[result]
        if opcode == "fusion":
            fused = _CALLEE.findall(rest)[0]
            inner, root = body[fused], roots[fused]
            params = {p: int(p_rest.split(")")[0]) for p, _, o, p_rest in inner if o == "parameter"}
        else:
            inner, root = [], (result, "", opcode, rest)
            params = {operand: i for i, operand in enumerate(operands)}
        root_operands = _operands(root[3])
        if root[2] in _IN_PLACE and root_operands[0] in params:
            read[params[root_operands[0]]] = 0
            written = sizes.get(root_operands[_IN_PLACE[root[2]]], 0)
        if opcode == "dynamic-slice":
            read[0] = written
        for param, index in params.items() if inner else ():
            users = [(u, o, _operands(u_rest)) for u, _, o, u_rest in inner if param in _operands(u_rest)]
            if users and all(o == "dynamic-slice" and ops[0] == param for _, o, ops in users):
                read[index] = sum(sizes[u] for u, _, _ in users)
        return float(sum(read) + written)

    kernels: list[Kernel] = []

    def walk(computation: str, runs: int) -> None:
        for result, _, opcode, rest in body[computation]:
            if opcode in _CONTROL:
                trips = _TRIP_COUNT.search(rest)
                times = int(trips.group(1)) if opcode == "while" and trips else 1
                for callee in _CALLEE.findall(rest):
                    walk(callee, runs * times)
            elif opcode not in _NO_KERNEL:
                dots = [dot_of(rest, shapes)] if opcode == "dot" else []
                if opcode == "fusion":
                    dots = [dot for callee in _CALLEE.findall(rest) for dot in fused_dots(callee)]
                kernels.append(Kernel(result, opcode, runs, moved(result, opcode, rest), tuple(dots)))

    walk(module.entry, 1)
    return kernels


# The largest matmul dot_timer runs: about 0.1 s at 100 GFLOP/s, arrays of at most 256 MiB. Slices this large
# time within ±10% of the whole matmul scaled by FLOPs (the 50k-vocab logits at 4096 tokens); with 2 GFLOPs and
# 64 MiB the logits' 25 MB slice stayed in cache and timed at 0.55x the whole.
TIMED_DOT_MAX_FLOPS = 1e10
TIMED_DOT_MAX_BYTES = 2**28


def timed_slice(dot: Dot) -> Dot:
    """The matmul dot_timer runs for `dot`: itself, or its `Dot.bounded` slice when it is over
    TIMED_DOT_MAX_FLOPS or TIMED_DOT_MAX_BYTES."""
    return dot.bounded(TIMED_DOT_MAX_FLOPS, TIMED_DOT_MAX_BYTES)


def dot_timer() -> Callable[[Dot], float]:
    """Seconds a Dot takes on this machine (hardware.measure_dot_seconds), each distinct Dot timed once, as its
    `timed_slice` scaled up by FLOPs."""

    def seconds(dot: Dot) -> float:
        part = timed_slice(dot)
        return (
            hardware.measure_dot_seconds(part.lhs, part.rhs, part.dimension_numbers) * dot.flops / part.flops
        )

    return functools.cache(seconds)


def predict_kernels(
    kernels: list[Kernel],
    dot_seconds: Callable[[Dot], float],
    fresh_bandwidth: float,
    reused_bandwidth: float,
    peak_flops: float,
    tokens_per_step: int,
    model_flops_per_step: float,
) -> Prediction:
    """The step time of one device running `kernels` one after another (the module docstring's CPU model): per
    kernel max(Σ dot_seconds over its matmuls, bytes / fresh_bandwidth) for its first run and the same with
    reused_bandwidth for each later one, in seconds and bytes/s, summed. compute_seconds and memory_seconds are
    the two terms summed over every run of every kernel; bound is 'compute' when the runs bound by their
    matmuls take longer in all than those bound by memory, else 'memory'; MFU is against peak_flops."""
    bound_by = {"compute": 0.0, "memory": 0.0}
    compute_seconds = memory_seconds = 0.0
    for k in kernels:
        compute = sum(dot_seconds(dot) for dot in k.dots)
        compute_seconds += k.runs * compute
        for memory, runs in ((k.bytes / fresh_bandwidth, 1), (k.bytes / reused_bandwidth, k.runs - 1)):
            bound_by["compute" if compute > memory else "memory"] += runs * max(compute, memory)
            memory_seconds += runs * memory
    seconds = sum(bound_by.values())
    return Prediction(
        seconds=seconds,
        bound=max(bound_by, key=bound_by.get),
        compute_seconds=compute_seconds,
        memory_seconds=memory_seconds,
        collective_seconds={},
        mfu=model_flops_per_step / (seconds * peak_flops),
        tokens_per_second=tokens_per_step / seconds,
    )
