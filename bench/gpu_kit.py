"""The Python half of bench/gpu_kit.sh: trims the bitsandbytes wheel, and proves the kit and the lent
machine's image together meet every requirement of the project and of the kit's own wheels.

    gpu_kit.py trim WHEEL KEEP...             keep only these of bitsandbytes' native libraries
    gpu_kit.py check WHEELS --python 3.12.3 --image bench/gpu_image.txt
    gpu_kit.py check WHEELS --python 3.11.7 --installed PYTHON   (the rehearsal's stand-in as the image)
    gpu_kit.py seed STANDIN bench/gpu_standin.txt                 (link what .venv holds; print the rest)
    gpu_kit.py standin PYTHON --image bench/gpu_image.txt        (the stand-in holds only image packages)

Needs ``packaging`` (in .venv, and on the image).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
NOT_CARRIED = {"ruff": "the linter: bench/gpu_check.sh does not lint"}
"""Requirements of pyproject's extras that the GPU machine does not need, and why."""


def trim(wheel: Path, keep: list[str]) -> str:
    """Drop bitsandbytes' native libraries for other CUDA, ROCm and XPU versions (each CUDA one is
    4-27 MB; the lent machine's torch is one CUDA build). ``keep`` are name stems such as ``cpu`` or
    ``cuda13``; the wheel is rewritten in place with a RECORD that lists what is left."""
    library = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.so$")
    with zipfile.ZipFile(wheel) as src:
        infos = src.infolist()
        kept = [i for i in infos
                if not (m := library.match(i.filename)) or any(m.group(1).startswith(k) for k in keep)]
        if not any(library.match(i.filename) for i in kept):
            raise SystemExit(f"gpu_kit.py trim: no library of {wheel.name} matches {keep}")
        record = next(i for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in kept:
            if info is record:
                lines.append(f"{info.filename},,")
                continue
            digest = base64.urlsafe_b64encode(hashlib.sha256(src.read(info)).digest()).rstrip(b"=").decode()
            lines.append(f"{info.filename},sha256={digest},{info.file_size}")
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in kept:
                data = "\n".join(lines).encode() + b"\n" if info is record else src.read(info)
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(wheel)
    names = [(m.group(1), info in kept) for info in infos if (m := library.match(info.filename))]
    return (f"{wheel.name}: kept the libraries {', '.join(n for n, k in names if k)}; "
            f"dropped {', '.join(n for n, k in names if not k)}")


def _wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(z.read(name).decode())


def _image(path: Path) -> dict[str, Version | None]:
    """``name`` or ``name==version`` lines, # comments."""
    image = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            image[canonicalize_name(name)] = Version(version) if version else None
    return image


def _installed(python: str) -> dict[str, Version | None]:
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    return {canonicalize_name(k): Version(v) for k, v in json.loads(out).items()}


def _project_requirements() -> list[tuple[Requirement, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [(r, "pyproject") for r in project["dependencies"]]
    for extra in ("worker", "dev"):
        lines += [(r, f"pyproject [{extra}]") for r in project["optional-dependencies"][extra]]
    requirements = [(Requirement(r), origin) for r, origin in lines]
    return [(r, origin) for r, origin in requirements if canonicalize_name(r.name) not in NOT_CARRIED]


def check(wheels: Path, python: str, image: dict[str, Version | None], image_label: str) -> int:
    """Walk the requirements from pyproject down through the kit's wheels; an image package ends a
    branch (its own requirements were met when the image was built)."""
    major_minor = ".".join(python.split(".")[:2])
    env = default_environment() | {"python_version": major_minor, "python_full_version": python,
                                   "sys_platform": "linux", "platform_system": "Linux",
                                   "platform_machine": "x86_64", "os_name": "posix",
                                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    kit: dict[str, tuple[Version, list[Requirement]]] = {}
    errors = []
    for path in sorted(wheels.glob("*.whl")):
        meta = _wheel_metadata(path)
        name = canonicalize_name(meta["Name"])
        if name in kit:
            errors.append(f"two wheels of {name} in {wheels}: keep one (pip stops on two)")
        kit[name] = (Version(meta["Version"]), [Requirement(r) for r in meta.get_all("Requires-Dist") or []])
    todo = [(req, origin, frozenset()) for req, origin in _project_requirements()]
    seen, by_kit, by_image, on_trust = set(), set(), set(), {}
    while todo:
        req, origin, extras = todo.pop()
        if req.marker and not any(req.marker.evaluate(env | {"extra": e}) for e in extras | {""}):
            continue
        name = canonicalize_name(req.name)
        if name in kit:
            version, requires = kit[name]
            by_kit.add(name)
        elif name in image:
            version, requires = image[name], []
            by_image.add(name)
            if version is None:
                on_trust.setdefault(name, set()).update(str(s) for s in req.specifier)
        else:
            errors.append(f"{name} ({origin} asks for {req}): neither in the kit nor on {image_label}: "
                          f"add it to bench/gpu_kit.txt")
            continue
        if version is not None and not req.specifier.contains(version, prereleases=True):
            where = "the kit's" if name in kit else f"{image_label}'s"
            errors.append(f"{name}: {origin} asks for {req.specifier}, {where} is {version}")
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        todo += [(r, f"{name} {version}", frozenset(req.extras)) for r in requires]
    shadowed = [f"{n} {image[n] or '(version unknown)'}" for n in sorted(kit) if n in image]
    unused = sorted(set(kit) - by_kit)
    print(f"gpu_kit: {len(kit)} wheels for Python {python}; every requirement met: {len(by_kit)} by the kit, "
          f"{len(by_image)} by {image_label}")
    if shadowed:
        print(f"gpu_kit: the kit's copy replaces {image_label}'s {', '.join(shadowed)}")
    if on_trust:
        trusted = [f"{n} {','.join(sorted(specs))}".strip() for n, specs in sorted(on_trust.items())]
        print(f"gpu_kit: {image_label} has these at a version nobody read; taken on trust: {'; '.join(trusted)}")
    if unused:
        errors.append(f"{', '.join(unused)} in the kit but nothing asks for them: drop them from bench/gpu_kit.txt")
    for line in errors:
        print(f"gpu_kit: ERROR {line}", file=sys.stderr)
    return 1 if errors else 0


def standin(python: str, image: dict[str, Version | None]) -> int:
    """The rehearsal proves nothing if its stand-in holds a package the lent image lacks."""
    extra = sorted(set(_installed(python)) - set(image))
    if extra:
        print(f"gpu_kit: ERROR the stand-in {python} holds {', '.join(extra)}, which the lent image lacks "
              f"(bench/gpu_image.txt): drop them from bench/gpu_standin.txt", file=sys.stderr)
        return 1
    print(f"gpu_kit: the stand-in holds only packages of the lent image ({len(_installed(python))})")
    return 0


def seed(standin: str, lock: Path) -> list[str]:
    """Hard-link into the stand-in every pinned distribution that this Python holds at the same
    version (torch alone is ~1 GB to unpack; .venv has the same build), and return the pins left for
    pip. The stand-in ends the same either way; linked files are replaced, never written, by Python."""
    code = "import sys, sysconfig; print(sysconfig.get_paths()['purelib']); print(sys.version_info[:2])"
    purelib, version = subprocess.run([standin, "-I", "-c", code], capture_output=True, text=True,
                                      check=True).stdout.splitlines()
    pins = [line.split("#", 1)[0].strip() for line in lock.read_text().splitlines()]
    pins = [p for p in pins if p]
    if version != str(sys.version_info[:2]):
        return pins
    here = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    left = []
    for pin in pins:
        req = Requirement(pin)
        dist = here.get(canonicalize_name(req.name))
        if dist is None or not req.specifier.contains(dist.version, prereleases=True) or not dist.files:
            left.append(pin)
            continue
        for file in dist.files:
            if file.parts[0] == "..":
                continue  # console scripts: the stand-in needs none
            target = Path(purelib, file)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(dist.locate_file(file), target)
            except FileExistsError:
                pass
            except OSError:
                shutil.copy2(dist.locate_file(file), target)
    return left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trim")
    p.add_argument("wheel", type=Path)
    p.add_argument("keep", nargs="+")
    p = sub.add_parser("check")
    p.add_argument("wheels", type=Path)
    p.add_argument("--python", required=True, help="the target's Python version, e.g. 3.12.3")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--image", type=Path, help="the image's package list (bench/gpu_image.txt)")
    group.add_argument("--installed", help="a Python whose installed packages stand for the image")
    p = sub.add_parser("seed")
    p.add_argument("standin")
    p.add_argument("lock", type=Path)
    p = sub.add_parser("standin")
    p.add_argument("python")
    p.add_argument("--image", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "trim":
        print(f"gpu_kit: {trim(args.wheel, args.keep)}")
        return 0
    if args.command == "seed":
        print("\n".join(seed(args.standin, args.lock)))
        return 0
    if args.command == "standin":
        return standin(args.python, _image(args.image))
    if args.image:
        return check(args.wheels, args.python, _image(args.image), "the image")
    return check(args.wheels, args.python, _installed(args.installed), "the stand-in")


if __name__ == "__main__":
    sys.exit(main())
