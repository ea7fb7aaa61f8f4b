"""Test/CI environment shim: let PyPI's torchvision import beside a CPU-only torch wheel.

PyPI's torchvision 0.28.0 (pulled in by lpips) is built against CUDA torch; beside the CPU wheel of
torch 2.13.0 its compiled ops library cannot load, and `import torchvision` then fails while
registering fake kernels for `torchvision::nms`/`qnms`. transformers imports torchvision whenever it
is installed, so that failure would break everything. Defining the two op schemas first lets
torchvision import; its compiled ops (nms, roi_align) stay unavailable, and boothkit never uses them.

This is environment set-up for this CPU sandbox, not part of boothkit: `make install` adds it to the
virtualenv (a .pth hook) only when `import torchvision` fails there. On a machine with matching
torch/torchvision builds it is never installed.
"""
from __future__ import annotations

import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBS: list = []


def define_missing_ops() -> None:
    """Define torchvision's op schemas if its compiled library did not."""
    import torch

    if hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "nms"):
        return
    if _real_ops_load():  # a torchvision built for this torch (a CUDA machine): nothing to stand in for
        return
    try:
        lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            lib.define(schema)
        _LIBS.append(lib)
    except RuntimeError:  # already defined by the real library
        pass


def _real_ops_load() -> bool:
    """Whether torchvision's compiled ops library loads beside this torch (it then defines the real schemas)."""
    import importlib.util
    from pathlib import Path

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return False
    for lib in sorted(Path(spec.origin).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


class _BeforeTorchvision:
    """Meta-path hook: runs define_missing_ops() just before torchvision is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None


def install_hook() -> None:
    if not any(isinstance(h, _BeforeTorchvision) for h in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def _install_pth_if_needed() -> None:
    import subprocess
    import sysconfig
    from pathlib import Path

    ok = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / "zz_boothkit_torchvision_shim.pth"
    if ok and not pth.exists():
        print("torchvision imports on its own; no shim needed")
        return
    here = Path(__file__).resolve().parent
    pth.write_text(f"{here}\nimport torchvision_shim; torchvision_shim.install_hook()\n")
    print(f"torchvision cannot load its compiled ops beside this torch build; installed {pth}")


if __name__ == "__main__":
    if "--install-if-needed" in sys.argv:
        _install_pth_if_needed()
