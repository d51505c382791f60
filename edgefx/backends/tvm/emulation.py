"""An emulated aarch64 board on an x86 host: qemu-user + an arm64 Python with TVM's runtime.

``prepare()`` builds, once, into ``~/.cache/edgefx/aarch64`` (``EDGEFX_CACHE`` moves it):

- ``root/``: an arm64 Python 3.11 and the shared libraries it needs, from Debian's own arm64
  packages (``apt-get download`` + ``dpkg -x``; no chroot, nothing installed system-wide);
- ``site/``: the aarch64 wheels of apache-tvm, apache-tvm-ffi (the same pins as on the host),
  numpy and their few pure dependencies, unzipped.

The host needs ``qemu-user`` and ``g++-aarch64-linux-gnu`` (Debian packages); as root,
``prepare()`` installs them with apt-get. ``run_python()`` runs a script on that Python under
qemu (start-up takes ~25 s: qemu interprets the whole of TVM's import); ``rpc_server_command()``
starts TVM's RPC server on it, an emulated board for tuning over RPC.

    python -m edgefx.backends.tvm.emulation prepare     # once; prints the cache folder
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from edgefx.errors import BackendError

TVM_PIN = "apache-tvm==0.27.0.post1"
TVM_FFI_PIN = "apache-tvm-ffi==0.1.14.post1"  # 0.1.15 segfaults in save_json (PLATFORM.md)
# cloudpickle (with psutil: apache-tvm's "rpc" extra): TVM's RPC server pickles the function
# it sends to its worker process
WHEELS = (TVM_PIN, TVM_FFI_PIN, "numpy", "ml_dtypes", "psutil", "typing_extensions", "cloudpickle")
HOST_PACKAGES = ("qemu-user", "g++-aarch64-linux-gnu")
# an arm64 Python 3.11 and the libraries its standard library loads
ARM64_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libssl3",
    "libbz2-1.0",
    "liblzma5",
    "libstdc++6",
    "libgcc-s1",
    "libsqlite3-0",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
    "libuuid1",
    "libdb5.3",
    "libgdbm6",
    "libnsl2",
    "libtirpc3",
    "libcrypt1",
    "libzstd1",
)
_READY = "ready.json"
QEMU = "qemu-aarch64"


def cache_dir() -> Path:
    base = os.environ.get("EDGEFX_CACHE") or Path.home() / ".cache" / "edgefx"
    return Path(base) / "aarch64"


def _recorded(folder: Path) -> dict:
    try:
        return json.loads((folder / _READY).read_text())
    except (OSError, ValueError):
        return {}


def is_ready() -> bool:
    return _recorded(cache_dir()).get("wheels") == list(WHEELS) and shutil.which(QEMU) is not None


def _run(cmd: Sequence[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise BackendError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.CalledProcessError as exc:
        tail = "\n".join((exc.stderr or exc.stdout or "").strip().splitlines()[-5:])
        raise BackendError(f"{what} failed ({' '.join(cmd[:4])} ...):\n{tail}") from None


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _install_host_tools() -> None:
    missing = [
        p
        for p, exe in zip(HOST_PACKAGES, (QEMU, "aarch64-linux-gnu-g++"), strict=True)
        if shutil.which(exe) is None
    ]
    if not missing:
        return
    if not _is_root() or shutil.which("apt-get") is None:
        raise BackendError(
            f"the aarch64 emulator needs the Debian packages {' '.join(missing)}",
            hint=f"sudo apt-get install -y {' '.join(missing)}",
        )
    _run(["apt-get", "update", "-qq"], "apt-get update")
    _run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        "installing " + " ".join(missing),
    )


def _arm64_root(root: Path) -> None:
    arches = _run(["dpkg", "--print-foreign-architectures"], "dpkg").stdout.split()
    if "arm64" not in arches:
        if not _is_root():
            raise BackendError(
                "downloading the arm64 Python needs Debian's arm64 package lists",
                hint="sudo dpkg --add-architecture arm64 && sudo apt-get update",
            )
        _run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64")
        _run(["apt-get", "update", "-qq"], "apt-get update")
    with tempfile.TemporaryDirectory(prefix="edgefx-debs-") as debs:
        try:
            _run(
                ["apt-get", "download", *(f"{p}:arm64" for p in ARM64_PACKAGES)],
                "apt-get download (arm64 Python)",
                cwd=debs,
            )
        except BackendError:
            if not _is_root():
                raise
            _run(["apt-get", "update", "-qq"], "apt-get update")
            _run(
                ["apt-get", "download", *(f"{p}:arm64" for p in ARM64_PACKAGES)],
                "apt-get download (arm64 Python)",
                cwd=debs,
            )
        for deb in sorted(Path(debs).glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}")


def _aarch64_site(site: Path, wheels: Sequence[str] = WHEELS) -> None:
    with tempfile.TemporaryDirectory(prefix="edgefx-wheels-") as folder:
        platforms = [
            a
            for p in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17")
            for a in ("--platform", f"{p}_aarch64")
        ]
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                *platforms,
                "-d",
                folder,
                *wheels,
            ],
            "pip download (aarch64 wheels)",
        )
        for wheel in sorted(Path(folder).glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)


def prepare(force: bool = False) -> Path:
    """Build (once) the cached arm64 Python + aarch64 TVM runtime; return the cache folder."""
    folder = cache_dir()
    if is_ready() and not force:
        return folder
    recorded = _recorded(folder)
    if not force and recorded.get("debs") == list(ARM64_PACKAGES) and shutil.which(QEMU):
        # a cache from before a wheel was added: fetch only the new wheels
        missing = [w for w in WHEELS if w not in recorded.get("wheels", [])]
        _aarch64_site(folder / "site", missing)
        (folder / _READY).write_text(json.dumps({**recorded, "wheels": WHEELS}))
        return folder
    _install_host_tools()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "root").mkdir(parents=True)
    (staging / "site").mkdir()
    _arm64_root(staging / "root")
    _aarch64_site(staging / "site")
    python = staging / "root" / "usr" / "bin" / "python3.11"
    if not python.is_file():
        raise BackendError(f"the arm64 packages did not provide {python}")
    (staging / _READY).write_text(json.dumps({"wheels": WHEELS, "debs": ARM64_PACKAGES}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# The arm64 Python's sys.executable, for the processes it starts: qemu-user passes an exec to
# the host kernel, which cannot run an aarch64 binary (no binfmt_misc here), so a program the
# emulated Python starts must go through qemu again.
_REENTER = "python3.11-qemu"
# python -c: sys.executable := argv[1], then run module argv[2] as __main__ with the rest
_LAUNCH = (
    "import runpy, sys; _, sys.executable, module, *rest = sys.argv; sys.argv = [module, *rest]; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def python_command(module: str, args: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that run ``python -m module args`` on the emulated arm64 Python,
    whose own child Pythons (TVM's RPC server starts one) are emulated too."""
    folder = prepare()
    root = folder / "root"
    python = root / "usr" / "bin" / "python3.11"
    reenter = folder / _REENTER
    if not reenter.is_file():
        reenter.write_text(f'#!/bin/sh\nexec {QEMU} -L "{root}" "{python}" "$@"\n')
        reenter.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(folder / "site"), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONHOME", None)
    return [QEMU, "-L", str(root), str(python), "-c", _LAUNCH, str(reenter), module, *args], env


def rpc_server_command(
    tracker: str, key: str, host: str = "127.0.0.1", port: int = 9090
) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of TVM's RPC server on the emulated board, registered with the
    tracker ``host:port`` under ``key``, as on a real board; it starts in ~1 minute."""
    args = ["--host", host, "--port", str(port), "--port-end", str(port + 1),
            "--tracker", tracker, "--key", key]  # fmt: skip
    return python_command("tvm.exec.rpc_server", args)


def run_python(
    script: str | Path,
    args: Sequence[str] = (),
    *,
    cwd: str | Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run ``script`` on the emulated arm64 Python (prepared on first use)."""
    folder = prepare()
    root = folder / "root"
    env = {**os.environ, "PYTHONPATH": str(folder / "site"), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONHOME", None)
    cmd = [QEMU, "-L", str(root), str(root / "usr" / "bin" / "python3.11"), str(script), *args]
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"the emulated aarch64 run of {script} took over {timeout:g} s"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgefx.backends.tvm.emulation")
    parser.add_argument("command", choices=("prepare", "where"))
    parser.add_argument("--force", action="store_true", help="rebuild the cache")
    args = parser.parse_args(argv)
    if args.command == "where":
        print(cache_dir(), "ready" if is_ready() else "not prepared")
        return 0
    try:
        print(prepare(force=args.force))
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
