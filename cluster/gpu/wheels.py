"""The packages a bare GPU host lacks, as ONE trimmed archive that travels with the working tree.

    python cluster/gpu/wheels.py build [--python 3.12]     # here: download, trim, pack, size-check
    python cluster/gpu/wheels.py unpack ARCHIVE DEST        # there: unpack what that Python lacks

It is for a GPU host without network access that has Python (3.12 by default), a CUDA torch and
typically transformers, peft, accelerate, pyarrow, pandas, typer, aiohttp and grpcio, but not Ray,
diffusers, DeepSpeed, FastAPI or pydantic; the archive may have to travel over a size-limited copy
together with the working tree (``--limit-mib``). So ``build`` downloads binary
wheels for the target Python at the versions of ``constraints.txt`` (``pip download --no-deps``),
builds DeepSpeed's sdist here into a pure-Python wheel (``DS_BUILD_OPS=0``: no compiled ops, so
nothing is built there), unpacks them into one ``site/`` tree, trims what the check never imports
(Ray's Java jars, RLlib, LLM, examples, the dashboard's web build, every ``tests/``, AVIF, most of
matplotlib's fonts and fontTools; the symbol tables of Ray's binaries and of shared objects) and
packs it as ``site.tar.xz``, alone in its folder (build/gpu-wheels by default, so the folder can be
copied whole). It fails when the archive plus the working tree would pass ``--limit-mib``. MLflow does not
travel: the check runs with tracking off.

Two kinds of package travel. ``PINNED`` ones are this project's own dependencies at its pinned
versions and always win. ``SUPPORT`` ones fill gaps: ``unpack`` deletes each of them that the target
Python already has at the same or a newer version, so the host's own copy is used unless it is
missing or older than what our packages need.

Standard library only (``build`` also needs pip, ``tar``, ``xz`` and, to build DeepSpeed, torch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "SYNFER_GPU_WHEELS.json"
ARCHIVE = "site.tar.xz"

# The project's own dependencies that a bare GPU host lacks: ours always win.
PINNED = ["ray", "diffusers", "deepspeed", "pydantic", "pydantic_core", "fastapi", "starlette", "uvicorn"]
# What those import at run time (found by running the check in a venv holding only a bare GPU host's
# packages; see README.md), plus pytest for `pytest -m gpu`. Used only where the host lacks them.
SUPPORT = [
    "annotated-types", "typing-inspection", "annotated-doc", "anyio", "h11",  # pydantic, fastapi, uvicorn
    "msgpack", "protobuf", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",  # ray core
    "attrs", "click", "filelock", "requests", "urllib3", "idna", "charset-normalizer", "certifi",
    "hjson", "py-cpuinfo", "einops",  # deepspeed
    "opentelemetry-api", "importlib_metadata", "zipp", "grpcio-reflection",  # fastapi, ray.serve
    "pillow",  # images everywhere
    "matplotlib", "contourpy", "cycler", "kiwisolver", "pyparsing", "python-dateutil", "six",  # reports
    "fonttools",  # matplotlib.dviread imports fontTools.agl at pyplot import
    "pytest", "pluggy", "iniconfig",  # `python -m pytest -m gpu`
    "typing_extensions", "packaging", "huggingface-hub",  # newer than an older host may have
]
# Where a host's own packages bound a support package tighter than constraints.txt does:
# diffusers 0.42 needs huggingface-hub >= 1.32, transformers 5.17 needs < 2; grpcio 1.84.0 refuses
# grpcio-reflection's generated code of any later version (Ray Serve imports it: `synfer serve`
# fails on such a host with grpcio-reflection 1.85.1).
ARCHIVE_PINS = {"huggingface-hub": "1.33.0", "grpcio-reflection": "1.84.0"}

# Paths (relative to site/) never imported by the check; every ``tests`` folder goes too.
TRIM = [
    "ray/jars", "ray/rllib", "ray/llm", "ray/tune/examples", "ray/dashboard/client/build", "ray/cpp",
    "ray/serve/_private/benchmarks", "ray/data/examples", "ray/train/examples",
    "matplotlib/mpl-data/sample_data", "matplotlib/mpl-data/images", "matplotlib/mpl-data/fonts/afm",
    "matplotlib/mpl-data/fonts/pdfcorefonts",
    "PIL/_avif", "pillow.libs/libavif",  # the AVIF plugin: a prefix, as the files carry version tags
]
# Packages of which only these entries are imported (fontTools: 15 MiB for one glyph-name table).
KEEP_ONLY = {"fontTools": ["__init__.py", "agl.py", "misc", "version.py"]}
# Ray's executables; every shared object outside auditwheel's ``*.libs`` folders is stripped too.
STRIP = ["ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """``{normalised name: version}`` from a pip constraints file."""
    found = {}
    for line in constraints.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            found[normalise(match.group(1))] = match.group(2)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_of(name: str, pinned: dict[str, str]) -> str:
    """The version of ``name`` the archive holds: its archive pin, else constraints.txt's."""
    version = ARCHIVE_PINS.get(name) or pinned.get(normalise(name))
    if version is None:
        raise SystemExit(f"error: {name} has no exact version in constraints.txt; pin it there first")
    return version


def requirement(name: str, pinned: dict[str, str]) -> str:
    return f"{name}=={version_of(name, pinned)}"


def pip(*args: str, env: dict | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--quiet"],
                          env=env, capture_output=True, text=True)
    if done.returncode:  # pip's warnings about unused local indexes only matter when it fails
        raise SystemExit(f"error: pip {args[0]} failed:\n{done.stdout}{done.stderr}")


def download(names: list[str], python: str, into: Path, pinned: dict[str, str]) -> None:
    """Binary wheels of ``names`` for CPython ``python`` on x86-64 Linux, without their dependencies."""
    into.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        *platforms, "--dest", str(into), *(requirement(name, pinned) for name in names))


def deepspeed_wheel(into: Path, pinned: dict[str, str]) -> Path:
    """DeepSpeed's sdist built here with DS_BUILD_OPS=0: a pure-Python wheel for any CPython 3."""
    into.mkdir(parents=True, exist_ok=True)
    built = sorted(into.glob("deepspeed-*.whl"))
    if not built:
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        pip("wheel", "--no-deps", "--no-build-isolation", "--no-binary", "deepspeed", "--wheel-dir", str(into),
            requirement("deepspeed", pinned), env=env)
        built = sorted(into.glob("deepspeed-*.whl"))
    return built[-1]


def wheel_name(path: Path) -> str:
    return normalise(path.name.split("-")[0])


def unpack_wheel(wheel: Path, site: Path) -> list[str]:
    """Extract ``wheel`` into ``site`` (its ``.data/purelib|platlib`` too); return the files it put there."""
    files = []
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if ".data" in parts[0] and parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # console scripts and headers: the check calls `python -m`
                parts = parts[2:]
            target = site.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
            mode = info.external_attr >> 16
            if mode:
                target.chmod(mode & 0o777)
            files.append("/".join(parts))
    return files


def trim(site: Path) -> int:
    """Delete what the check never imports; return the bytes removed."""
    before = tree_bytes(site)
    for relative in TRIM:
        for path in (site / relative).parent.glob((site / relative).name + "*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for package, keep in KEEP_ONLY.items():
        for path in (site / package).iterdir() if (site / package).is_dir() else ():
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for folder in sorted(site.rglob("tests"), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not folder.relative_to(site).parts[0].startswith(("_pytest", "pytest")):
            shutil.rmtree(folder, ignore_errors=True)
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    fonts = site / "matplotlib" / "mpl-data" / "fonts" / "ttf"
    if fonts.is_dir():  # matplotlib's default font family only
        for font in fonts.iterdir():
            if not font.name.startswith(("DejaVuSans", "LastResort")):
                font.unlink()
    if shutil.which("strip"):  # symbol tables only: what runs is unchanged
        shared = [p for p in site.rglob("*.so*") if p.is_file() and not p.parent.name.endswith(".libs")]
        for path in shared + [site / relative for relative in STRIP if (site / relative).is_file()]:
            subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
    return before - tree_bytes(site)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def tracked_bytes() -> int:
    """The working tree that travels beside the archive: tracked files and untracked ones git does not ignore."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             check=True, capture_output=True).stdout.decode()
    return sum((ROOT / name).stat().st_size for name in listing.split("\0") if name and (ROOT / name).is_file())


def build(python: str, out: Path, work: Path, limit_mib: float) -> Path:
    pinned = pins()
    tag = python.replace(".", "")
    wheels = work / f"wheels-py{tag}"
    site = work / f"site-py{tag}" / "site"
    shutil.rmtree(site.parent, ignore_errors=True)
    site.mkdir(parents=True)
    binary = [name for name in PINNED + SUPPORT if name != "deepspeed"]
    print(f"downloading {len(binary)} wheels for CPython {python} into {wheels}", flush=True)
    download(binary, python, wheels, pinned)
    print("building deepspeed (DS_BUILD_OPS=0, no compiled ops)", flush=True)
    # The download folder is a cache: a pin changed since the last build leaves the old wheel beside
    # the new one, so only the wheel at the wanted version counts.
    wanted_versions = {normalise(name): version_of(name, pinned) for name in binary}
    found = {wheel_name(w): w for w in wheels.glob("*.whl")
             if wanted_versions.get(wheel_name(w)) == w.name.split("-")[1]}
    found["deepspeed"] = deepspeed_wheel(work / "deepspeed", pinned)
    wanted = {normalise(name) for name in PINNED + SUPPORT}
    missing = sorted(wanted - set(found))
    if missing:
        raise SystemExit(f"error: no wheel for {missing} in {wheels}")
    manifest = {"python": python, "pinned": {}, "support": {}}
    sizes = {}
    for name in sorted(wanted):
        files = unpack_wheel(found[name], site)
        version = found[name].name.split("-")[1]
        if name in {normalise(p) for p in PINNED}:
            manifest["pinned"][name] = version
        else:
            manifest["support"][name] = {"version": version, "files": files}
        sizes[name] = sum((site / f).stat().st_size for f in files if (site / f).is_file())
    removed = trim(site)
    for entry in manifest["support"].values():  # trimmed files are no longer there to delete
        entry["files"] = [f for f in entry["files"] if (site / f).is_file()]
    (site / MANIFEST).write_text(json.dumps(manifest, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # the folder is carried whole: only this archive may be in it
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    archive = out / ARCHIVE
    print(f"packing {tree_bytes(site) / 2**20:.1f} MiB (trimmed {removed / 2**20:.1f} MiB) as {archive}",
          flush=True)
    subprocess.run(["tar", "-C", str(site.parent), "-cf", str(archive), "--use-compress-program", "xz -9 -T0",
                    "site"], check=True)
    archive_mib, tree_mib = archive.stat().st_size / 2**20, tracked_bytes() / 2**20
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:6]
    print("largest unpacked: " + ", ".join(f"{name} {size / 2**20:.1f}" for name, size in largest) + " MiB")
    print(f"archive {archive} {archive_mib:.1f} MiB + working tree {tree_mib:.1f} MiB = "
          f"{archive_mib + tree_mib:.1f} MiB (limit {limit_mib:g} MiB, --limit-mib)")
    if archive_mib + tree_mib > limit_mib:
        raise SystemExit(f"error: {archive_mib + tree_mib:.1f} MiB would not travel; trim more (TRIM in {__file__}) "
                         f"or move packages from SUPPORT to what the GPU host has")
    return archive


# --- on the GPU host ----------------------------------------------------------------------------

def installed_version(name: str) -> str | None:
    """The version of ``name`` as this Python sees it without our tree on its path, or None."""
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """``"2.9.0.post0"`` -> ``(2, 9, 0)``: enough to tell older from newer here."""
    return tuple(int(part) for part in re.findall(r"\d+", re.split(r"[+a-z]", version.lower())[0])[:4])


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest/site``; drop each SUPPORT package this Python already has at
    the same or a newer version, so only what it lacks goes on PYTHONPATH. Returns the site folder."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(dest), "-xf", str(archive)], check=True)
    site = dest / "site"
    manifest = json.loads((site / MANIFEST).read_text())
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != running:
        raise SystemExit(f"error: {archive} holds packages for Python {manifest['python']}, this is {running}; "
                         f"build it with `make gpu-wheels PY={running}`")
    used_own, kept = [], []
    for name, entry in manifest["support"].items():
        own = installed_version(name)
        if own is not None and release(own) >= release(entry["version"]):
            used_own.append(name)
            for relative in entry["files"]:
                (site / relative).unlink(missing_ok=True)
        else:
            kept.append(name)
    for folder in sorted((p for p in site.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    print(f"unpacked {archive} into {site}: pinned {', '.join(f'{k} {v}' for k, v in manifest['pinned'].items())}; "
          f"support from the archive: {', '.join(kept) or 'none'}; the machine's own: {', '.join(used_own) or 'none'}",
          file=sys.stderr, flush=True)
    return site


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="download, trim and pack (here, with network)")
    make.add_argument("--python", default="3.12", help="target CPython version (the GPU host's; default 3.12)")
    make.add_argument("--out", type=Path, help="folder for the archive alone (default build/gpu-wheels[-pyXY])")
    make.add_argument("--work", type=Path, default=ROOT / "build" / "gpu-wheels-work")
    make.add_argument("--limit-mib", type=float, default=63.0,
                      help="size cap in MiB for the archive plus the working tree, for when they must travel "
                           "over a size-limited copy (default 63)")
    take = commands.add_parser("unpack", help="unpack on the GPU host; prints the site folder (what it did: stderr)")
    take.add_argument("archive", type=Path)
    take.add_argument("dest", type=Path)
    args = parser.parse_args()
    if args.command == "build":
        out = args.out or default_folder(args.python)
        build(args.python, out, args.work, args.limit_mib)
    else:
        print(unpack(args.archive, args.dest))


def default_folder(python: str) -> Path:
    """``build/gpu-wheels`` for the default 3.12, ``build/gpu-wheels-py311`` for a dry run here."""
    suffix = "" if python == "3.12" else f"-py{python.replace('.', '')}"
    return ROOT / "build" / f"gpu-wheels{suffix}"


if __name__ == "__main__":
    main()
