"""An entry point's process keeps freed memory: a large buffer allocated and freed again is not faulted in anew."""

import os
import subprocess
import sys

from chinchax import malloc

MIB = 256
# Allocates, touches and frees MIB MiB five times; prints GLIBC_TUNABLES and the minor page faults of rounds 2-5.
ROUNDS = f"""
from chinchax import malloc
malloc.keep_freed_memory()
import ctypes, os, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size, faults = {MIB} << 20, []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    libc.memset(ctypes.c_void_p(p), 1, size)
    libc.free(ctypes.c_void_p(p))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(os.environ.get("GLIBC_TUNABLES"), max(faults[1:]), sep="|")
"""


def rounds(env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, check=True)
    tunables, faults = out.stdout.strip().split("|")
    return tunables, int(faults)


def test_a_reexecuted_process_keeps_freed_memory():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    pages = (MIB << 20) // os.sysconf("SC_PAGE_SIZE")
    tunables, faults = rounds(env)
    assert tunables == malloc.TUNABLES
    assert faults < pages // 20, f"{faults} page faults re-touching a freed {MIB} MiB buffer"
    # The user's own GLIBC_TUNABLES wins (here: glibc's defaults), and then every round faults the buffer in.
    tunables, faults = rounds({**env, "GLIBC_TUNABLES": ""})
    assert tunables == ""
    assert faults > pages * 0.9


def test_gpu_and_tpu_hosts_keep_glibcs_defaults(tmp_path):
    """No re-execution where JAX will not run on the CPU: JAX_PLATFORMS naming an accelerator, or unset with an
    accelerator plugin installed (a stand-in distribution's metadata on PYTHONPATH); JAX_PLATFORMS=cpu wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_PLATFORMS")}
    assert rounds({**env, "JAX_PLATFORMS": "cuda"})[0] == "None"
    assert rounds({**env, "JAX_PLATFORMS": "tpu,cpu"})[0] == "None"
    for plugin in ("jax_cuda12_plugin", "libtpu"):
        site = tmp_path / plugin
        (site / f"{plugin}-1.0.dist-info").mkdir(parents=True)
        (site / f"{plugin}-1.0.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {plugin}\n")
        with_plugin = {**env, "PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")])}
        assert rounds(with_plugin)[0] == "None", plugin
        assert rounds({**with_plugin, "JAX_PLATFORMS": "cpu"})[0] == malloc.TUNABLES, plugin
