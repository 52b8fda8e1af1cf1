"""The "Grassmann LoRA" tab: Similarity, Kernel matrix, Merge, Convert, Compare.

The callbacks are plain functions of plain values (testable without gradio);
``build`` wires them to components. Written once for gradio 3.41 (A1111) and
4.x (Forge): only constructors, ``.click`` and ``gr.update(...)`` are used.
Each callback returns a message for the tab's status line first: errors are one
readable line there, never a traceback, and never reach the WebUI.
"""
from __future__ import annotations

import logging
import os
import re
import threading

from . import host, service
from ..core.errors import LoraError

log = logging.getLogger("grassmann_lora")
STOP = threading.Event()           # set by the Interrupt button; checked between modules / images
TXT2IMG_IDS = {"txt2img_prompt": "prompt", "txt2img_neg_prompt": "negative_prompt", "txt2img_seed": "seed",
               "txt2img_steps": "steps", "txt2img_width": "width", "txt2img_height": "height",
               "txt2img_cfg_scale": "cfg_scale", "txt2img_sampling": "sampler_name"}
TXT2IMG: dict[str, object] = {}     # field -> the txt2img tab's component (on_after_component)
MERGE_HEADERS = ["source", "weight", "energy kept", "φ to merge"]
# the reports are column-aligned text: style.css (loaded by the WebUI from the
# extension root) gives these boxes a monospace font
MONO = "grassmann-lora-mono"
MARKDOWN_CHARS = re.compile(r"([\\`*_\[\]<>$&~|])")    # what gradio's Markdown (and its HTML) would act on


def _progress(progress, what: str):
    if progress is None:
        return None
    return lambda done, total: progress((done, total), desc=what)


def plain(message: str) -> str:
    """The status line as Markdown that reads as written: the status is a
    gr.Markdown, where a name like a*b<c> lost its * (emphasis) and <c> (HTML)."""
    return MARKDOWN_CHARS.sub(r"\\\1", message)


def guarded(n_outputs: int):
    """Run a callback; on failure return (message, unchanged outputs…) instead of raising."""
    def wrap(fn):
        def run(*args, **kwargs):
            STOP.clear()
            try:
                status, *rest = fn(*args, **kwargs)
                return (plain(status), *rest)
            except (service.RequestError, LoraError) as err:
                message = f"Error: {' '.join(str(err).split())}"
            except service.Interrupted:
                message = "Interrupted."
            except Exception as err:   # noqa: BLE001 - keep the WebUI alive, say what broke
                log.exception("Grassmann LoRA: %s failed", fn.__name__)
                message = f"Error: {type(err).__name__}: {' '.join(str(err).split())}"
            return (plain(message),) + tuple(_unchanged() for _ in range(n_outputs))
        run.__name__ = fn.__name__
        run.__doc__ = fn.__doc__
        return run
    return wrap


def _unchanged():
    try:
        import gradio as gr
        return gr.update()
    except ImportError:        # unit tests without gradio
        return None


def lora_names() -> list[str]:
    return [x["name"] for x in service.list_loras()]


def refresh_names() -> list[str]:
    host.refresh()
    return lora_names()


def stop() -> str:
    """Interrupt: stops our work between modules and the WebUI's renders between steps."""
    STOP.set()
    try:
        from modules import shared
        shared.state.interrupt()
    except ImportError:
        pass
    return "Interrupting…"


def _opt_int(value) -> int | None:
    return int(value) if value not in (None, "") and int(value) > 0 else None


@guarded(3)
def similarity(a, b, side, top, module, progress=None):
    """→ (status, summary, heatmap, φ grid)."""
    body = {"a": a, "b": b, "side": side, "top": _opt_int(top), "module": (module or "").strip() or None}
    answer, report = service.similarity(body, _progress(progress, "similarity"), STOP)
    grid = report.grid_image(answer["module"], report.sides[0]) if answer.get("phi_grid") else None
    return "", answer["summary"], report.heatmap_image(), grid


@guarded(3)
def kernel(loras, kernel_name, beta, side, clusters, progress=None):
    """→ (status, summary, heatmap, matrix rows)."""
    body = {"loras": list(loras or []), "kernel": kernel_name, "beta": float(beta), "side": side,
            "clusters": _opt_int(clusters)}
    answer, km, result = service.kernel(body, _progress(progress, "kernel matrix"), STOP)
    names = [os.path.splitext(n)[0] for n in answer["result"].get("names", body["loras"])]
    rows = [[names[i]] + [f"{v:.4f}" for v in row] for i, row in enumerate(km.matrix.tolist())]
    return answer.get("note", ""), answer["summary"], km.heatmap_image(result), rows


def parse_weights(text: str, n: int) -> list[float] | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        weights = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise service.RequestError(f"weights must be numbers separated by commas, got '{text}'")
    if len(weights) != n:
        raise service.RequestError(f"{len(weights)} weight(s) for {n} LoRA(s)")
    return weights


def parse_block_weights(text: str, n: int) -> list[str | None] | None:
    from ..core.merge.blocks import spec_lines

    specs = spec_lines(text, n)
    if specs is not None and len(specs) != n:
        raise service.RequestError(f"{len(specs)} block-weight line(s) for {n} LoRA(s)")
    return specs


def merge_rows(report) -> list[list[str]]:
    s = report.summary()
    rows = []
    for k, name in enumerate(report.sources):
        kept, phi = s["kept"].get(name), s["phi"].get(name)
        rows.append([os.path.splitext(name)[0], f"{report.weights[k]:g}",
                     "-" if kept is None else f"{kept:.3f}", "-" if phi is None else f"{phi:.3f}"])
    return rows


MERGE_PARAMS = (("energy", float), ("space", str), ("keep", float), ("ties_density", float),
                ("dare_drop", float), ("seed", int))    # merge()'s last inputs, in order; None: the table's default


@guarded(3)
def merge(loras, weights, method, rank, dtype, name, overwrite, rank_auto=False, block_weights="",
          normalise=False, energy=None, space=None, keep=None, ties_density=None, dare_drop=None, seed=None,
          progress=None):
    """→ (status, fidelity rows, report text, <lora:name:1>)."""
    loras = list(loras or [])
    given = (energy, space, keep, ties_density, dare_drop, seed)
    body = {"loras": loras, "weights": parse_weights(weights, len(loras)), "method": method,
            "rank": "auto" if rank_auto else _opt_int(rank), "dtype": dtype, "name": (name or "").strip() or None,
            "overwrite": bool(overwrite), "block_weights": parse_block_weights(block_weights, len(loras)),
            "normalise": bool(normalise),
            **{key: kind(v) for (key, kind), v in zip(MERGE_PARAMS, given) if v not in (None, "")}}
    answer, result = service.merge(body, _progress(progress, "merge"), STOP)
    rel = result.report.summary()["rel_error"]
    status = (f"Saved {answer['file']} ({'overwritten, caches cleared' if answer['overwritten'] else 'new'}); "
              f"relative error {'-' if rel is None else f'{rel:.3e}'}.")
    return status, merge_rows(result.report), answer["table"], answer["prompt"]


@guarded(1)
def convert(lora, name, dtype):
    """→ (status, details)."""
    body = {"lora": lora, "name": (name or "").strip() or None, "dtype": None if dtype == "as stored" else dtype}
    a = service.convert(body)
    notes = "".join(f"\nnote: {w}" for w in a["warnings"])
    return f"Saved {a['file']}.", (f"{a['source']} ({a['source_format']}, {a['family']}, {a['modules']} modules) "
                                   f"→ {a['file']}; use {a['prompt']}{notes}")


@guarded(2)
def compare(loras, prompt, negative, seed, steps, width, height, cfg, sampler, weight, progress=None):
    """→ (status, grid, difference rows)."""
    from .compare import render

    body = {"loras": list(loras or []), "prompt": prompt or "", "negative_prompt": negative or "",
            "seed": int(seed), "steps": int(steps), "width": int(width), "height": int(height),
            "cfg_scale": float(cfg), "sampler_name": sampler or "Euler a", "weight": float(weight)}
    answer, result = render(body, _progress(progress, "rendering"))
    _, rows = result.table()
    return f"Seed {answer['settings']['seed']}, {len(rows)} images.", result.grid, rows


def capture_component(component, **kwargs) -> None:
    """on_after_component: remember the txt2img fields Compare can copy."""
    field = TXT2IMG_IDS.get(kwargs.get("elem_id") or getattr(component, "elem_id", None))
    if field:
        TXT2IMG[field] = component


def on_ui_settings() -> None:
    import gradio as gr
    from modules import shared

    section = ("grassmann_lora", "Grassmann LoRA")
    add = shared.opts.add_option
    add("grassmann_lora_method", shared.OptionInfo("karcher", "Default merge method", gr.Dropdown,
                                                   {"choices": list(service.merge_methods())}, section=section))
    add("grassmann_lora_dtype", shared.OptionInfo("fp16", "Default dtype of saved merges", gr.Radio,
                                                  {"choices": ["fp16", "bf16", "fp32"]}, section=section))
    add("grassmann_lora_prefix", shared.OptionInfo(service.DEFAULT_PREFIX, "Name prefix of new merges "
                                                   "(each gets <prefix>-<date-time>)", section=section))


def build():
    """The tab's gr.Blocks."""
    import gradio as gr
    from ..core.kernels import DEFAULT_KERNEL, KERNELS
    from ..core.merge.blocks import SPEC_HELP
    from ..core.merge.methods import DARE_DROP, ENERGY, KEEP, NORMALISE, SEED, SPACE, TIES_DENSITY

    def progress_fn(fn):
        def with_progress(*args, progress=gr.Progress()):
            return fn(*args, progress=progress)
        with_progress.__name__ = fn.__name__
        return with_progress

    try:
        names = lora_names()
    except Exception:   # noqa: BLE001 - an empty list rather than no tab
        names = []
    methods = list(service.merge_methods())
    with gr.Blocks(analytics_enabled=False) as ui:
        with gr.Row():
            status = gr.Markdown("", elem_id="grassmann_lora_status")
        with gr.Row():
            refresh = gr.Button("Refresh LoRA list", elem_id="grassmann_lora_refresh")
            stop_btn = gr.Button("Interrupt", variant="stop", elem_id="grassmann_lora_stop")
        pickers = []
        with gr.Tabs():
            with gr.Tab("Similarity"):
                with gr.Row():
                    a = gr.Dropdown(names, label="LoRA A", elem_id="grassmann_lora_sim_a")
                    b = gr.Dropdown(names, label="LoRA B", elem_id="grassmann_lora_sim_b")
                    side = gr.Radio(list(service.SIDES), value="out", label="Side")
                    top = gr.Number(0, label="Top K (0 = effective rank)", precision=0)
                    module = gr.Textbox("", label="φ grid of module (optional)")
                sim_btn = gr.Button("Compare subspaces", variant="primary", elem_id="grassmann_lora_sim_run")
                sim_text = gr.Textbox(label="Summary", lines=14, max_lines=40, elem_classes=[MONO])
                with gr.Row():
                    sim_heat = gr.Image(label="Heatmap", type="pil")
                    sim_grid = gr.Image(label="φ(i, j) grid", type="pil")
                pickers += [a, b]
            with gr.Tab("Kernel matrix"):
                with gr.Row():
                    k_loras = gr.Dropdown(names, multiselect=True, label="LoRAs (two or more)")
                    k_kernel = gr.Dropdown(list(KERNELS), value=DEFAULT_KERNEL, label="Kernel")
                    k_beta = gr.Number(1.0, label="β")
                    k_side = gr.Radio(list(service.SIDES), value="out", label="Side")
                    k_clusters = gr.Number(0, label="Clusters (0 = eigengap)", precision=0)
                k_btn = gr.Button("Kernel matrix", variant="primary")
                k_text = gr.Textbox(label="Clusters and summary", lines=12, max_lines=40, elem_classes=[MONO])
                with gr.Row():
                    k_heat = gr.Image(label="Heatmap", type="pil")
                    k_table = gr.Dataframe(label="Matrix", interactive=False)
                pickers.append(k_loras)
            with gr.Tab("Merge"):
                with gr.Row():
                    m_loras = gr.Dropdown(names, multiselect=True, label="LoRAs to merge",
                                          elem_id="grassmann_lora_merge_loras")
                    m_weights = gr.Textbox("", label="Weights (comma-separated; empty = 1/N each)")
                with gr.Row():
                    m_method = gr.Dropdown(methods, value=host.option("grassmann_lora_method", "karcher"),
                                           label="Method")
                    m_rank = gr.Number(0, label="Rank (0 = per module the smallest source rank)", precision=0)
                    m_auto = gr.Checkbox(False, label=f"Auto rank (keep {ENERGY.default:.0%} of the energy, share "
                                                      "under Method parameters; the means: shared directions)", info=ENERGY.help)
                    m_dtype = gr.Radio(["fp16", "bf16", "fp32"], value=host.option("grassmann_lora_dtype", "fp16"),
                                       label="dtype")
                    m_name = gr.Textbox("", label="Name (empty = new unique name)")
                    m_overwrite = gr.Checkbox(False, label="Overwrite an existing LoRA of that name")
                with gr.Row():
                    m_blocks = gr.Textbox("", lines=3, elem_id="grassmann_lora_merge_blocks",
                                          label="Block weights (one line per chosen LoRA, in order; empty line = none)",
                                          placeholder="INS\n1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0\nIN04=0,M00=0.5",
                                          info=f"Each line: {SPEC_HELP}.")
                    m_normalise = gr.Checkbox(False, label="Normalise (linear, concat, svd)", info=NORMALISE.help)
                with gr.Accordion("Method parameters", open=False):
                    with gr.Row():
                        m_energy = gr.Number(ENERGY.default, label="Auto rank: energy share", info=ENERGY.help)
                        m_space = gr.Radio(list(SPACE.choices), value=SPACE.default, label="Space (ties, dare)",
                                           info=SPACE.help)
                        m_keep = gr.Number(KEEP.default, label="Keep (tsv)", info=KEEP.help)
                        m_density = gr.Number(TIES_DENSITY.default, label="Density (ties, knots-ties)",
                                              info=TIES_DENSITY.help)
                        m_drop = gr.Number(DARE_DROP.default, label="Drop probability (dare, knots-dare)",
                                           info=DARE_DROP.help)
                        m_seed = gr.Number(SEED.default, label="Seed", precision=0, info=SEED.help)
                m_btn = gr.Button("Merge and save", variant="primary", elem_id="grassmann_lora_merge_run")
                m_prompt = gr.Textbox(label="Use in the prompt", show_copy_button=True, interactive=False)
                m_table = gr.Dataframe(headers=MERGE_HEADERS, label="Fidelity per source", interactive=False)
                m_text = gr.Textbox(label="Fidelity by block group", lines=12, max_lines=40, elem_classes=[MONO])
                pickers.append(m_loras)
            with gr.Tab("Convert"):
                with gr.Row():
                    c_lora = gr.Dropdown(names, label="LoRA (any format)")
                    c_name = gr.Textbox("", label="Name (empty = <name>-kohya)")
                    c_dtype = gr.Radio(["as stored", "fp16", "bf16", "fp32"], value="as stored", label="dtype")
                c_btn = gr.Button("Convert to kohya names", variant="primary")
                c_text = gr.Textbox(label="Result", lines=3)
                pickers.append(c_lora)
            with gr.Tab("Compare"):
                with gr.Row():
                    v_loras = gr.Dropdown(names, multiselect=True, label="LoRAs (sources and merges)")
                    v_weight = gr.Number(1.0, label="LoRA weight")
                    v_copy = gr.Button("Copy txt2img settings")
                with gr.Row():
                    v_prompt = gr.Textbox("", label="Prompt", lines=2)
                    v_negative = gr.Textbox("", label="Negative prompt", lines=2)
                with gr.Row():
                    v_seed = gr.Number(1234, label="Seed (fixed)", precision=0)
                    v_steps = gr.Number(20, label="Steps", precision=0)
                    v_width = gr.Number(512, label="Width", precision=0)
                    v_height = gr.Number(512, label="Height", precision=0)
                    v_cfg = gr.Number(7.0, label="CFG scale")
                    v_sampler = gr.Textbox("Euler a", label="Sampler")
                v_btn = gr.Button("Render base, each LoRA, grid", variant="primary")
                v_grid = gr.Image(label="Grid", type="pil")
                v_table = gr.Dataframe(headers=["image", "MAD to base", "SSIM to base"], interactive=False)
                pickers.append(v_loras)

        def refreshed():
            names = refresh_names()
            return tuple(gr.update(choices=names) for _ in pickers)

        refresh.click(refreshed, inputs=[], outputs=pickers)
        stop_btn.click(stop, inputs=[], outputs=[status])
        sim_btn.click(progress_fn(similarity), inputs=[a, b, side, top, module],
                      outputs=[status, sim_text, sim_heat, sim_grid])
        k_btn.click(progress_fn(kernel), inputs=[k_loras, k_kernel, k_beta, k_side, k_clusters],
                    outputs=[status, k_text, k_heat, k_table])
        m_btn.click(progress_fn(merge), inputs=[m_loras, m_weights, m_method, m_rank, m_dtype, m_name, m_overwrite,
                                                m_auto, m_blocks, m_normalise, m_energy, m_space, m_keep, m_density,
                                                m_drop, m_seed],
                    outputs=[status, m_table, m_text, m_prompt]).then(refreshed, inputs=[], outputs=pickers)
        c_btn.click(convert, inputs=[c_lora, c_name, c_dtype], outputs=[status, c_text]) \
            .then(refreshed, inputs=[], outputs=pickers)
        v_btn.click(progress_fn(compare), inputs=[v_loras, v_prompt, v_negative, v_seed, v_steps, v_width, v_height,
                                                  v_cfg, v_sampler, v_weight], outputs=[status, v_grid, v_table])
        ours = {"prompt": v_prompt, "negative_prompt": v_negative, "seed": v_seed, "steps": v_steps,
                "width": v_width, "height": v_height, "cfg_scale": v_cfg, "sampler_name": v_sampler}
        fields = [f for f in ours if f in TXT2IMG]
        if fields:
            v_copy.click(copy_settings(fields), inputs=[TXT2IMG[f] for f in fields], outputs=[ours[f] for f in fields])
    return ui


def copy_settings(fields: list[str]):
    """txt2img values → Compare's fields; a random seed (-1) becomes a fixed one."""
    def copy(*values):
        out = list(values)
        if "seed" in fields:
            i = fields.index("seed")
            if out[i] is None or int(out[i]) < 0:
                out[i] = 1234
        return tuple(out) if len(out) > 1 else out[0]
    return copy


def on_ui_tabs():
    return [(build(), "Grassmann LoRA", "grassmann_lora")]
