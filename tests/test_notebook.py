"""tpu_setup/colab.ipynb executed top to bottom with nbclient, on CPU, in its tiny mode.

The notebook's Colab-only steps (clone, pip install) skip themselves outside Colab; ``EASYTUNE_NOTEBOOK_TINY=1``
turns on its few-step mode; a cell injected after the one tagged ``parameters`` (papermill's convention) sends
the runs and the converted model to ``tmp_path``. The kernel is this interpreter's own ipykernel
(``sys.executable``), started in the repository root, so it imports this checkout's easytune.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install -e '.[test]')")
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "tpu_setup" / "colab.ipynb"
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
CELL_TIMEOUT_S = 300


def _inject_parameters(nb, values: dict) -> None:
    """Inserts ``NAME = repr(value)`` lines after the cell tagged ``parameters`` (as papermill does)."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def _this_python_kernel():
    """A kernel manager for ``python3`` run by ``sys.executable``: with no kernelspec directories to search,
    jupyter_client falls back to ipykernel's native spec, which uses the current interpreter (a ``python3``
    spec elsewhere in the Jupyter path, e.g. one made by ``ipykernel install --user``, is not consulted)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow
def test_colab_notebook_tiny_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("EASYTUNE_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # One device, as on a Colab CPU runtime; LLVM without optimizations compiles the ~30 XLA programs of the
    # two runs about a third faster (nothing here compares numbers).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    runs, model_dir = tmp_path / "runs", tmp_path / "models" / "stories260K"
    _inject_parameters(nb, {"RUN_ROOT": str(runs), "MODEL_DIR": str(model_dir)})

    client = nbclient.NotebookClient(nb, km=_this_python_kernel(), timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) when a cell fails

    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "not on Colab: nothing to install" in text
    assert f"repository root: {REPO}" in text
    assert "psum of 1.0 over all devices: 1 (expected 1)" in text

    qs = json.loads((runs / "quickstart" / "summary.json").read_text())
    assert qs["optimizer_steps"] == 4
    assert math.isfinite(qs["final_eval_loss"]) and qs["final_eval_loss"] < qs["initial_eval_loss"]
    assert "final train loss" in text and "quickstart: 4 optimizer steps" in text
    assert "### Input:\n71940385\n\n### Response:\n" in text  # easytune generate printed prompt + answer

    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    if SHARED_DATA.is_dir():
        st = json.loads((runs / "stories260k_lora" / "summary.json").read_text())
        assert st["optimizer_steps"] == 4 and st["method"] == "lora"
        assert math.isfinite(st["final_eval_loss"])
        assert (model_dir / "config.json").is_file()
        printed = text.split("$ easytune generate")[-1].split("\n", 1)[1]  # after the command line
        assert printed.startswith("ROMEO:") and printed.strip() != "ROMEO:", printed
        assert len(images) == 2
    else:
        assert "skipping the stories260K LoRA: file not found" in text
        assert len(images) == 1
