"""Learning curves: ``curves.png`` from ``metrics.jsonl``, and an underfit / overfit / well-fit diagnosis.

The diagnosis follows the fine-tuning guide's definitions of the three shapes of a learning curve:

* **overfit**: the validation loss reaches a minimum and then rises (by more than ``rise_tol`` of the
  minimum, at least ``min_delta``) while training goes on; the run should have stopped at that step.
* **underfit**: the training loss is flat (it fell by less than ``flat_tol`` of its start: the model is
  not learning) or is still falling steeply at the end (the last quarter of the run still brought more
  than ``steep_tol`` of the whole decrease: train longer or with a higher learning rate).
* **well-fit**: both losses plateau; the generalization gap (final validation loss minus final smoothed
  training loss, in nats per token) is reported as a number.
* **unknown**: fewer than 4 logged training losses, or a training plateau without any validation loss (a
  run with ``data.val_set_size = 0`` cannot tell a good fit from overfitting).

Training losses are smoothed with a trailing moving average over a tenth of the logged points before the
shape is judged; validation losses are used as logged (they are already averages over the whole split).
"""

from __future__ import annotations

import io
import json
import logging
import math
import pathlib

import numpy as np

from easytune import config as config_lib
from easytune import paths

log = logging.getLogger(__name__)


def _smooth(y: np.ndarray) -> np.ndarray:
    w = max(1, len(y) // 10)
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(len(y)):
        lo = max(0, i + 1 - w)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def diagnose(train_steps, train_loss, val_steps, val_loss, *, min_delta: float = 0.0, rise_tol: float = 0.01,
             flat_tol: float = 0.02, steep_tol: float = 0.15) -> dict:
    """Classifies a run's learning curves as ``"overfit"``, ``"underfit"`` or ``"well-fit"``.

    Args:
        train_steps, train_loss: optimizer steps (ints, ascending) and mean training loss per token (nats).
        val_steps, val_loss: steps and token-weighted validation loss at each evaluation (may be empty).
        min_delta: smallest rise of the validation loss (nats) that counts as overfitting
            (``train.early_stopping_min_delta``).
        rise_tol: the rise must also exceed this fraction of the minimum validation loss.
        flat_tol: a training loss falling by less than this fraction of its start is "flat".
        steep_tol: "still falling steeply" = the last quarter of the steps brought more than this fraction
            of the whole smoothed decrease.

    Returns:
        dict with ``verdict`` (``"overfit"`` | ``"underfit"`` | ``"well-fit"`` | ``"unknown"``), ``reason``
        (one sentence), ``suggestion``, ``best_step`` / ``best_eval_loss`` (validation minimum),
        ``final_train_loss`` (smoothed), ``final_eval_loss``, ``generalization_gap`` (final validation
        minus final smoothed training loss; None without validation).

    Raises:
        ValueError: steps and losses of different lengths.
    """
    ts, tl = np.asarray(train_steps, np.int64), np.asarray(train_loss, np.float64)
    vs, vl = np.asarray(val_steps, np.int64), np.asarray(val_loss, np.float64)
    if len(ts) != len(tl) or len(vs) != len(vl):
        raise ValueError(f"diagnose: {len(ts)} train steps vs {len(tl)} losses, {len(vs)} eval steps vs "
                         f"{len(vl)} losses")
    keep = np.isfinite(tl)
    ts, tl = ts[keep], tl[keep]
    out = {"verdict": "unknown", "reason": "", "suggestion": "", "best_step": None, "best_eval_loss": None,
           "final_train_loss": None, "final_eval_loss": None, "generalization_gap": None}
    if len(vl):
        i = int(np.argmin(vl))
        out.update(best_step=int(vs[i]), best_eval_loss=float(vl[i]), final_eval_loss=float(vl[-1]))
    if len(tl) < 4:
        out["reason"] = f"only {len(tl)} logged training losses; too few to judge the curve"
        return out
    sm = _smooth(tl)
    out["final_train_loss"] = float(sm[-1])
    if len(vl):
        out["generalization_gap"] = float(vl[-1] - sm[-1])

    if len(vl) >= 3:
        i = int(np.argmin(vl))
        rise = float(vl[-1] - vl[i])
        if i < len(vl) - 1 and rise > max(min_delta, rise_tol * abs(vl[i])):
            out.update(verdict="overfit",
                       reason=(f"validation loss reached its minimum {vl[i]:.4f} at step {vs[i]}, then rose to "
                               f"{vl[-1]:.4f} at step {vs[-1]} (+{rise:.4f}) while training loss kept falling "
                               f"to {sm[-1]:.4f}"),
                       suggestion=(f"stop at step {vs[i]}: set train.max_steps={vs[i]}, or "
                                   f"train.early_stopping_patience; more data or regularization "
                                   f"(lora.lora_dropout, optim.weight_decay) also help"))
            return out

    start = float(np.mean(tl[:max(1, len(tl) // 10)]))
    total = start - float(sm[-1])
    if total < flat_tol * abs(start):
        out.update(verdict="underfit",
                   reason=f"training loss is flat: {start:.4f} -> {sm[-1]:.4f} ({-total:+.4f}) over {ts[-1]} steps",
                   suggestion="the model is not learning: raise optim.learning_rate, check the data and "
                              "loss mask (easytune prepare --debug), or train more parameters")
        return out
    q = int(np.searchsorted(ts, ts[0] + 0.75 * (ts[-1] - ts[0])))
    q = min(q, len(sm) - 2)
    late = float(sm[q] - sm[-1])
    if late > steep_tol * total:
        out.update(verdict="underfit",
                   reason=(f"training loss is still falling steeply at the end: the last quarter of the run "
                           f"(steps {ts[q]}-{ts[-1]}) brought {late:.4f} of the total decrease {total:.4f} "
                           f"({100 * late / total:.0f}%)"),
                   suggestion="train longer (train.num_epochs / train.max_steps) or with a higher learning rate")
        return out
    gap = out["generalization_gap"]
    if gap is None:  # no validation split: a plateau alone says nothing about generalization
        out.update(reason=(f"training loss plateaued at {sm[-1]:.4f}, but there is no validation loss, so "
                           f"over- or well-fitting cannot be told apart"),
                   suggestion="hold out validation data (data.val_set_size, e.g. 0.05) and train.eval_steps")
        return out
    out.update(verdict="well-fit",
               reason=("training loss plateaued at {:.4f}".format(sm[-1]) +
                       f" and validation loss at {vl[-1]:.4f}; generalization gap {gap:+.4f} nats/token"),
               suggestion="keep this checkpoint; the final one is also the best" if out["best_step"] == int(vs[-1])
               else f"the best validation loss was at step {out['best_step']}")
    return out


def format_diagnosis(d: dict) -> str:
    """One printable paragraph for :func:`diagnose`'s dict."""
    lines = [f"diagnosis: {d['verdict']}: {d['reason']}"]
    if d.get("generalization_gap") is not None and d["verdict"] != "well-fit":
        lines.append(f"  generalization gap (final eval - train): {d['generalization_gap']:+.4f}")
    if d.get("suggestion"):
        lines.append(f"  suggestion: {d['suggestion']}")
    return "\n".join(lines)


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl``.

    Raises:
        FileNotFoundError: no ``metrics.jsonl``; ValueError: a line that is not JSON (names the line).
    """
    path = paths.run_path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not an easytune run directory (no metrics.jsonl)")
    rows = []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):  # the last line of a run killed mid-write
                log.warning("%s:%d: skipping a half-written last line", path, n)
                continue
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from e
    return rows


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict], out_png: str | pathlib.Path, diagnosis: dict | None = None,
                title: str = "") -> pathlib.Path:
    """Writes the learning-curve figure: train and validation loss, learning rate and gradient norm against
    optimizer step (epochs on the top axis when known), the best validation step marked.

    Args:
        rows: ``metrics.jsonl`` rows (``step``, ``train/loss``, ``eval/loss``, ``learning_rate``,
            ``grad_norm``, ``epoch``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]},
                             dpi=80)
    ax = axes[0]
    s, y = _series(rows, "train/loss")
    ax.plot(s, y, lw=0.8, alpha=0.45, color="C0", label="train (per step)")
    if len(y) >= 4:
        ax.plot(s, _smooth(np.asarray(y, np.float64)), color="C0", lw=1.6, label="train (smoothed)")
    vs, vy = _series(rows, "eval/loss")
    if vs:
        ax.plot(vs, vy, "o-", color="C1", ms=3, label="validation")
    if diagnosis and diagnosis.get("best_step") is not None:
        ax.axvline(diagnosis["best_step"], color="C2", ls="--", lw=1,
                   label=f"best validation (step {diagnosis['best_step']})")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    es, ev = _series(rows, "epoch")
    spe = next((st / e for st, e in zip(es, ev) if e > 0), None)
    if spe:
        sec = ax.secondary_xaxis("top", functions=(lambda x: x / spe, lambda x: x * spe))
        sec.set_xlabel("epoch")
    heading = title or "learning curves"
    if diagnosis:
        heading += f" - {diagnosis['verdict']}"
        if diagnosis.get("generalization_gap") is not None:
            heading += f" (gap {diagnosis['generalization_gap']:+.3f})"
    ax.set_title(heading, fontsize=10)
    for ax, key, label in ((axes[1], "learning_rate", "learning rate"), (axes[2], "grad_norm", "grad norm")):
        s, y = _series(rows, key)
        ax.plot(s, y, color="C3" if key == "grad_norm" else "C4", lw=1)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("optimizer step")
    fig.tight_layout()
    out_png = paths.run_path(out_png)
    buf = io.BytesIO()  # through epath, so a gs:// run directory works too
    fig.savefig(buf, format="png")
    plt.close(fig)
    out_png.write_bytes(buf.getvalue())
    return out_png


def _run_min_delta(cfg: pathlib.Path) -> float:
    """``train.early_stopping_min_delta`` of a run's ``config.json``; the default where the file or key is absent.

    Only this key is read, so a config.json that another easytune version wrote (unknown or retyped keys) still
    plots."""
    values = json.loads(cfg.read_text()) if cfg.is_file() else {}
    train = values.get("train") if isinstance(values, dict) else None
    if isinstance(train, dict) and isinstance(train.get("early_stopping_min_delta"), (int, float)):
        return float(train["early_stopping_min_delta"])
    return float(config_lib.defaults().train.early_stopping_min_delta)


def plot_run(run_dir: str | pathlib.Path, min_delta: float | None = None) -> dict:
    """``easytune plot RUN_DIR``: diagnoses ``metrics.jsonl``, writes ``curves.png`` and adds ``diagnosis``
    to ``summary.json`` (created if missing).

    Args:
        min_delta: overfitting threshold in nats (default: the run's ``train.early_stopping_min_delta``).

    Returns:
        the diagnosis dict of :func:`diagnose`, plus ``curves_png`` (path).

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``metrics.jsonl``.
    """
    run_dir = paths.run_path(run_dir)
    rows = read_metrics(run_dir)
    if min_delta is None:
        min_delta = _run_min_delta(run_dir / "config.json")
    ts, tl = _series(rows, "train/loss")
    vs, vl = _series(rows, "eval/loss")
    d = diagnose(ts, tl, vs, vl, min_delta=min_delta)
    png = plot_curves(rows, run_dir / "curves.png", d, title=run_dir.name)
    d = {**d, "curves_png": str(png)}
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"run_dir": str(run_dir)}
    summary["diagnosis"] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
    summary_file.write_text(json.dumps(summary, indent=2, default=str))
    return d
