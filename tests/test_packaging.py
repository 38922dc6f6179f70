"""What a fresh machine installs: the lock file against setup.cfg and the environment, and the kernels' import name.

References: setup.cfg's own ranges (read with configparser and `packaging`), the installed distributions'
metadata, and a bare venv that installs `./kernels` the way another project would.
"""

import configparser
import importlib.metadata
import json
import pathlib
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
LOCKED_EXTRAS = ("test", "lock")


def locked_versions() -> dict[str, str]:
    """requirements.lock as {canonical name: exact version}."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCK}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def setup_cfg_requirements() -> list[Requirement]:
    """setup.cfg's install_requires and the extras the lock covers."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lists = [cfg["options"]["install_requires"]]
    lists += [cfg["options.extras_require"][extra] for extra in LOCKED_EXTRAS]
    return [Requirement(line) for text in lists for line in text.strip().splitlines()]


def test_the_lock_pins_every_requirement_of_setup_cfg_within_its_range():
    pins = locked_versions()
    for requirement in setup_cfg_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is in setup.cfg but not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside setup.cfg's {requirement}: run `make lock`"
        )


def test_this_environment_is_the_locked_one():
    """`make test` installs from the lock: every installed distribution the lock names has its locked version."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert {"jax", "flax", "torch", "transformers"} <= installed.keys()
    differ = [
        f"{name} {installed[name]} (locked {version})"
        for name, version in locked_versions().items()
        if name in installed and installed[name] != version
    ]
    assert not differ, "not the locked environment (`make install-test` installs it): " + ", ".join(differ)


def test_import_kernels_from_the_repository_root_is_not_this_repository():
    """transformers imports Hugging Face's `kernels`; run from the root, that name must not find our folder."""
    probe = (
        "import importlib.util, json; s = importlib.util.find_spec('kernels'); "
        "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout)
    assert found is not None, "Hugging Face's `kernels` (a transformers dependency) is not installed"
    origin, locations = found
    for path in [origin, *locations]:
        assert path and not pathlib.Path(path).resolve().is_relative_to(REPO / "kernels"), (
            f"`import kernels` from {REPO} finds {path}, this repository's folder"
        )
    assert importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py").samefile(origin)


@pytest.fixture(scope="module")
def kernels_wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel `pip install ./kernels` builds."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", out, REPO / "kernels"],
        check=True,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def test_the_kernels_wheel_holds_chinchax_kernels_and_nothing_named_kernels(kernels_wheel):
    names = zipfile.ZipFile(kernels_wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"chinchax_kernels", "chinchax_kernels-0.1.0.dist-info"}, top_level
    modules = {name.split("/")[1] for name in names if name.startswith("chinchax_kernels/")}
    sources = {path.name for path in (REPO / "kernels" / "chinchax_kernels").glob("*.py")}
    assert modules == sources


@pytest.mark.slow
def test_pip_install_kernels_in_a_bare_venv_runs_blockwise_attention(kernels_wheel, tmp_path):
    """A bare venv, `pip install ./kernels` (jax at the locked version), then the kernel against a plain softmax."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--constraint", LOCK, REPO / "kernels"],
        check=True,
    )
    check = """
import chinchax_kernels, numpy as np, jax.numpy as jnp
rng = np.random.default_rng()
q, k, v = (rng.standard_normal((2, 70, 3, 16)) for _ in range(3))
s = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
s = np.where(np.tril(np.ones((70, 70), bool)), s, -np.inf)
p = np.exp(s - s.max(-1, keepdims=True))
want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
got = chinchax_kernels.blockwise_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), block_q=16, block_k=32)
print(chinchax_kernels.__file__, float(np.abs(np.asarray(got) - want).max()))
"""
    out = subprocess.run([python, "-c", check], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, error = out.stdout.split()
    assert pathlib.Path(path).is_relative_to(venv), path
    assert float(error) < 1e-5, error
