"""The MONAI model zoo's bundle checks that run offline, for any bundle folder.

What the zoo's CI (``ci/verify_bundle.py``) and contributing guide check, without a
network: the required files (``configs/metadata.json``, ``LICENSE``; preferred
``models/model.pt``, ``configs/inference.json``), the version in the changelog, the
metadata against the zoo's schema (a local copy, ``bundles/kits/schema/meta_schema.json``),
``verify_net_in_out`` and the TorchScript export of ``network_def`` with the weights. To
those the house rules add (``docs/BUNDLES.md``): ``docs/data_license.txt``, the template
README sections, installable version pins and the bundle-property ids MONAI defines.

Two layouts are checked: the zoo's (``configs/``, ``models/``: an exported bundle) and the
in-repo one (configs at the bundle root, no weights), where ``verify_net_in_out`` runs on
``train.json``'s ``network_io`` (the image-only view) or ``network_def``.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sam3d.presets import BUNDLE_DIR

SCHEMA = BUNDLE_DIR / "kits" / "schema" / "meta_schema.json"
README_SECTIONS = (
    "Authors",
    "Tags",
    "Model Description",
    "Data",
    "Preprocessing",
    "Performance",
    "System Configuration",
    "Limitations",
    "References",
)
NOT_ON_INDEX = {"sam3d-med": "install it from a source checkout (pip install -e <checkout>)"}
INFER_ALSO = ("preprocessing", "postprocessing")  # optional inference ids we require


@dataclass(frozen=True)
class ZooCheck:
    """One check's outcome: ``ok`` False fails the bundle; ``note`` is informational."""

    name: str
    ok: bool
    detail: str = ""


def _config(root: Path, name: str) -> Path | None:
    for suffix in ("json", "yaml", "yml"):
        if (root / f"{name}.{suffix}").is_file():
            return root / f"{name}.{suffix}"
    return None


def layout(path: str | os.PathLike) -> str:
    """``"zoo"`` (configs/metadata.json) or ``"flat"`` (metadata.json at the bundle root)."""
    return "zoo" if (Path(path) / "configs" / "metadata.json").is_file() else "flat"


def readme_sections(text: str) -> list[str]:
    """The template sections missing from a README (headings, any level, bold or not)."""
    heads = {
        re.sub(r"[*_`]|\(optional\)", "", h, flags=re.I).strip().lower()
        for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    }
    return [s for s in README_SECTIONS if s.lower() not in heads]


def declared_requirements(dist: str = "sam3d-med") -> dict[str, Any]:
    """The project's declared dependency ranges (``pyproject.toml``, as installed), by
    canonical name: the one place a bundle's pins are checked against."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        lines = requires(dist) or []
    except PackageNotFoundError:
        return {}
    out = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out[canonicalize_name(req.name)] = req.specifier
    return out


def _pins(metadata: dict[str, Any]) -> list[str]:
    """Problems of the version pins: each must be a version inside the project's declared
    range for that package (so a dependency's new release breaks no pin)."""
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    pins = dict(metadata.get("required_packages_version") or {})
    pins.update(metadata.get("optional_packages_version") or {})
    pins.update(
        {
            "monai": metadata.get("monai_version"),
            "torch": metadata.get("pytorch_version"),
            "numpy": metadata.get("numpy_version"),
        }
    )
    declared = declared_requirements()
    problems = []
    for name, pin in pins.items():
        if name in NOT_ON_INDEX:
            problems.append(f"{name} is not on the package index: {NOT_ON_INDEX[name]}")
            continue
        try:
            version = Version(str(pin))
        except InvalidVersion:
            problems.append(f"{name}=={pin} is not a version")
            continue
        spec = declared.get(canonicalize_name(name))
        if spec is None:
            problems.append(f"{name} is pinned but sam3d-med does not declare it")
        elif not spec.contains(version, prereleases=True):
            problems.append(f"{name}=={pin} is outside sam3d-med's declared range {name}{spec}")
    return problems


def _missing_ids(config_files: list[Path], ids: list[str]) -> list[str]:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    return [i for i in ids if i.replace("::", "#") not in parser]


def _property_ids(kind: str, also: tuple[str, ...] = ()) -> list[str]:
    from monai.bundle import properties

    table = {"train": properties.TrainProperties, "infer": properties.InferProperties}[kind]
    return [p["id"] for p in table.values() if p["required"] or kind == "train" or p["id"] in also]


def check_bundle(
    path: str | os.PathLike,
    schema: str | os.PathLike = SCHEMA,
    overrides: dict[str, Any] | None = None,
    network: bool = True,
    export: bool = True,
) -> list[ZooCheck]:
    """Run the offline zoo checks on the bundle folder ``path``.

    ``overrides`` are config id-value pairs for the network checks (a tiny preset, a
    smaller ``_meta_#network_data_format#inputs#image#spatial_shape``). ``network``: run
    ``verify_net_in_out``; ``export``: also export ``network_def`` with ``models/model.pt``
    to TorchScript (zoo layout).
    """
    from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

    root = Path(path)
    zoo = layout(root) == "zoo"
    conf = root / "configs" if zoo else root
    meta_file = conf / "metadata.json"
    checks: list[ZooCheck] = []

    def add(name: str, problems: list[str]) -> None:
        checks.append(ZooCheck(name, not problems, "; ".join(problems)))

    need = [meta_file, root / "LICENSE", root / "docs" / "data_license.txt"]
    if zoo:
        need.append(root / "models" / "model.pt")
    missing = [str(p.relative_to(root)) for p in need if not p.is_file()]
    infer = _config(conf, "inference")
    if infer is None:
        missing.append(f"{conf.relative_to(root) if zoo else '.'}/inference.json")
    add("files", [f"missing {m}" for m in missing])
    if not meta_file.is_file():
        return checks
    metadata = ConfigParser.load_config_file(str(meta_file))

    readme = root / "docs" / "README.md"
    if readme.is_file():
        gone = readme_sections(readme.read_text())
        add("readme", [f"docs/README.md lacks the section {s!r}" for s in gone])
    else:
        add("readme", ["no docs/README.md"])

    version = metadata.get("version")
    add(
        "changelog",
        [] if version in (metadata.get("changelog") or {}) else [f"{version} not in changelog"],
    )
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))
        add("metadata", [])
    except ValueError as e:
        add("metadata", [str(e).strip().splitlines()[0][:300]])
    add("pins", _pins(metadata))

    problems = []
    train = _config(conf, "train")
    if train is not None:
        problems += [f"train: no {i}" for i in _missing_ids([train], _property_ids("train"))]
    if infer is not None:
        ids = _property_ids("infer", INFER_ALSO)
        problems += [f"inference: no {i}" for i in _missing_ids([infer], ids)]
    add("properties", problems)

    overrides = dict(overrides or {})
    device = str(overrides.pop("device", "cpu"))
    if zoo:
        net_id, net_config = "network_def", infer
        overrides.setdefault("bundle_root", str(root))
    else:
        net_config = train
        net_id = (
            "network_io" if train and not _missing_ids([train], ["network_io"]) else "network_def"
        )
    if network and net_config is not None:
        try:
            verify_net_in_out(
                net_id=net_id, meta_file=str(meta_file), config_file=str(net_config),
                device=device, **overrides,
            )  # fmt: skip
            add("net_in_out", [])
        except Exception as e:  # the network's own error is the message
            add("net_in_out", [f"{net_id}: {type(e).__name__}: {str(e).strip()[:300]}"])
    weights = root / "models" / "model.pt"
    if zoo and network and export and infer is not None and weights.is_file():
        checks += _check_torchscript(root, meta_file, infer, overrides)
    return checks


def _check_torchscript(
    root: Path, meta_file: Path, infer: Path, overrides: dict[str, Any]
) -> list[ZooCheck]:
    """``ckpt_export`` of ``network_def`` + ``models/model.pt`` (traced), reloaded, logits
    compared with the eager network; and whether the zoo's default (script) works."""
    from monai.bundle import ConfigParser, ckpt_export

    from sam3d.apps.export import load_weights
    from sam3d.models.export import example_input

    parser = ConfigParser()
    parser.read_config(str(infer))
    parser.read_meta(str(meta_file))
    for k, v in overrides.items():
        parser[k] = v
    net = load_weights(parser.get_parsed_content("network_def"), root / "models" / "model.pt")
    net.eval()
    x = example_input(net)
    out: list[ZooCheck] = []
    with tempfile.TemporaryDirectory() as tmp:
        ts = Path(tmp) / "verify_model.ts"
        try:
            ckpt_export(
                net_id="network_def", filepath=str(ts), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=str(meta_file), config_file=str(infer), use_trace=True,
                input_shape=list(x.shape), **overrides,
            )  # fmt: skip
            with torch.no_grad():
                diff = (torch.jit.load(str(ts))(x) - net(x)).abs().max().item()
            ok = diff <= 1e-4
            out.append(ZooCheck("torchscript", ok, f"traced, max |logit diff| {diff:.2e}"))
        except Exception as e:
            out.append(ZooCheck("torchscript", False, f"{type(e).__name__}: {str(e)[:300]}"))
    shipped = root / "models" / "model.ts"
    if shipped.is_file():
        try:
            with torch.no_grad():
                diff = (torch.jit.load(str(shipped))(x) - net(x)).abs().max().item()
            out.append(ZooCheck("model.ts", diff <= 1e-4, f"max |logit diff| {diff:.2e}"))
        except Exception as e:
            out.append(ZooCheck("model.ts", False, f"{type(e).__name__}: {str(e)[:300]}"))
    try:
        torch.jit.script(net)
        out.append(ZooCheck("torchscript_script", True, "scriptable"))
    except Exception as e:  # a note: the zoo lists such bundles in exclude_verify_torchscript_list
        first = (str(e).strip().splitlines() or [""])[0][:120]
        out.append(
            ZooCheck(
                "torchscript_script",
                True,
                "note: not scriptable (zoo CI: exclude_verify_torchscript_list, or "
                f"ckpt_export --use_trace True): {first}",
            )
        )
    return out


def failures(checks: list[ZooCheck]) -> list[ZooCheck]:
    """The failed checks."""
    return [c for c in checks if not c.ok]
