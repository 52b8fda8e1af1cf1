"""The example workflows as ComfyUI API-format graphs, and the files a test run puts in them.

``example_workflows/api/<name>.json`` are written from here (``python
tests/integration/example_graphs.py``); the UI-format ``example_workflows/<name>.json``
that ComfyUI's template browser offers are those graphs loaded into the real
front end and saved by it (``tests/integration/browser_check.py --export``), with a
Note that says what to pick and how to make the run fast on a CPU.
The integration test runs the API graphs and checks the UI files describe the
same graph.

ComfyUI 0.33's template browser shows a custom node's template by its file name
(title and description alike) with ``<name>.jpg`` beside it as the thumbnail, so
the names say what each workflow does.

The shipped graphs pick no checkpoint and no LoRA (empty choices): a user has none
of our test files, and the front end outlines a missing file in red. A test run
fills in :data:`RUN_FILES` with :func:`runnable`: the random-weight SD1.5
checkpoint and the real SD1.5 fixtures (``../shared/fixtures/real_loras``).
ComfyUI reads the diffusers-processor and LyCORIS files as they are; the
cloneofsimo ones are written as kohya files by ``python -m core convert``
(ComfyUI has no mapping for that format). :func:`prepare_loras` lays them out.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# the real LoRA fixtures and the headless browser, for the scripts that drive the front end
REAL_LORAS = Path(os.environ.get("GRASSMANN_REAL_LORAS", REPO.parent / "shared" / "fixtures" / "real_loras"))
BROWSER = Path(os.environ.get("PLAYWRIGHT_CORE_DIR", Path.home() / ".cache" / "grassmann_lora" / "browser"))


def browser_env() -> dict:
    """This process's environment with the browser's location set for the node scripts."""
    return dict(os.environ, PLAYWRIGHT_CORE_DIR=str(BROWSER))
WORKFLOWS_DIR = REPO / "example_workflows"
API_DIR = WORKFLOWS_DIR / "api"

CHECKPOINT = "random_sd15_test.safetensors"   # the test runs' random-weight checkpoint
NONE = ""                                      # a choice left to the user

SIDE_BY_SIDE = "1 Merge two LoRAs three ways, compare images"
LIBRARY_MAP = "2 Map a LoRA library, cluster it"
TWO_LORA = "3 Compare two LoRAs layer by layer"
MERGE_FIDELITY = "4 Merge three ways, measure what each keeps"
# Workflow 1 as shipped: the fast size for CPUs (SD1.5's own 512×512 × 20 steps × five
# images takes most of an hour on a small CPU); the Note gives the GPU size.
SIZE, STEPS = 256, 12

# name in the loras folder -> (fixture file, convert to kohya?)
LORAS = {
    "catundchat__pytorch_lora_weights.safetensors": ("catundchat__pytorch_lora_weights.safetensors", False),
    "cloneofsimo__analog_svd_rank4_sd15_kohya.safetensors": ("cloneofsimo__analog_svd_rank4_sd15.safetensors", True),
    "cloneofsimo__lora_disney_sd15_kohya.safetensors": ("cloneofsimo__lora_disney_sd15.safetensors", True),
    "cloneofsimo__lora_kiriko2_sd15_te_kohya.safetensors": ("cloneofsimo__lora_kiriko2_sd15.text_encoder.pt", True),
    "lycoris__smart_falcon_4_lokr.safetensors": ("lycoris__smart_falcon_4_lokr.safetensors", False),
    "lycoris__smart_falcon_8_lokr.safetensors": ("lycoris__smart_falcon_8_lokr.safetensors", False),
}
LORA_A = "catundchat__pytorch_lora_weights.safetensors"
LORA_B = "cloneofsimo__analog_svd_rank4_sd15_kohya.safetensors"
SAVED_MERGE = "grassmann_karcher_merge.safetensors"

# side-by-side: (label, id of the node whose MODEL/CLIP feed the sampler)
SIDE_BY_SIDE_SOURCES = [("LoRA A", "4"), ("LoRA B", "5"), ("Karcher merge", "6"),
                        ("Linear merge", "7"), ("SVD merge", "8")]
POSITIVE = "a cozy cottage in a snowy forest, warm light in the windows, illustration"
NEGATIVE = "blurry, low quality"


def _node(class_type: str, title: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


# The merge node's optional widgets at their defaults: the front end sends them all.
MERGE_OPTIONS = {"karcher_max_iter": 50, "space": "core", "tsv_keep": 1.0, "rank_auto": False,
                 "energy": 0.99, "block_weights": "", "normalise": False}


def _merges(g: dict, merges) -> None:
    """Karcher Merge LoRA nodes (node id, method, title) of LoRA A ("2") and B ("3")."""
    for node_id, method, title in merges:
        g[node_id] = _node("GrassmannLoRAKarcherMerge", title, model=["1", 0], clip=["1", 1],
                           method=method, rank=0, weights="", dtype="fp16", strength_model=1.0,
                           strength_clip=1.0, ties_density=0.2, dare_drop=0.5, dare_seed=0,
                           lora_1=["2", 0], lora_2=["3", 0], **MERGE_OPTIONS)


def _rendered_grid(g: dict, branches, reference: int) -> None:
    """Per (label, MODEL/CLIP node) one prompt, KSampler and decode (ids 20 + 10k …
    23 + 10k, latent "10"), batched ("70") into a Compare Grid ("80")."""
    decoded = []
    for k, (label, src) in enumerate(branches):
        pos, neg, sampler, decode = (str(20 + 10 * k + i) for i in range(4))
        g[pos] = _node("CLIPTextEncode", f"Prompt ({label})", clip=[src, 1], text=POSITIVE)
        g[neg] = _node("CLIPTextEncode", f"Negative ({label})", clip=[src, 1], text=NEGATIVE)
        g[sampler] = _node("KSampler", f"KSampler ({label})", model=[src, 0], positive=[pos, 0],
                           negative=[neg, 0], latent_image=["10", 0], seed=42, steps=STEPS, cfg=7.0,
                           sampler_name="euler", scheduler="normal", denoise=1.0)
        g[decode] = _node("VAEDecode", f"Decode ({label})", samples=[sampler, 0], vae=["1", 2])
        decoded.append(decode)
    g["70"] = _node("BatchImagesNode", "Batch Images", **{f"images.image{k}": [d, 0]
                                                          for k, d in enumerate(decoded)})
    g["80"] = _node("GrassmannLoRACompareGrid", "Compare Grid", images=["70", 0],
                    labels="\n".join(label for label, _ in branches), reference=reference,
                    columns=0, upscale=0)


def side_by_side() -> dict:
    """checkpoint → LoRA A, LoRA B, Karcher / linear / svd merges → one prompt and seed →
    five KSamplers → Compare Grid → SaveImage (+ the Karcher merge saved as a LoRA)."""
    g = {
        "1": _node("CheckpointLoaderSimple", "Load Checkpoint (SD1.5)", ckpt_name=NONE),
        "2": _node("GrassmannLoRALoad", "LoRA A", lora_name=NONE),
        "3": _node("GrassmannLoRALoad", "LoRA B", lora_name=NONE),
        "4": _node("GrassmannLoRAApply", "Apply LoRA A", model=["1", 0], clip=["1", 1], lora=["2", 0],
                   strength_model=1.0, strength_clip=1.0, dtype="as stored"),
        "5": _node("GrassmannLoRAApply", "Apply LoRA B", model=["1", 0], clip=["1", 1], lora=["3", 0],
                   strength_model=1.0, strength_clip=1.0, dtype="as stored"),
        "10": _node("EmptyLatentImage", "Empty Latent Image", width=SIZE, height=SIZE, batch_size=1),
    }
    _merges(g, (("6", "karcher", "Karcher merge"), ("7", "linear", "Linear merge"), ("8", "svd", "SVD merge")))
    g["9"] = _node("GrassmannLoRASave", "Save Karcher merge", lora=["6", 2], filename=SAVED_MERGE,
                   dtype="as stored", overwrite=False)
    _rendered_grid(g, SIDE_BY_SIDE_SOURCES, reference=0)
    g["81"] = _node("SaveImage", "Save grid", images=["80", 0], filename_prefix="grassmann_side_by_side")
    return g


LIBRARY = [
    "catundchat__pytorch_lora_weights.safetensors",
    "cloneofsimo__analog_svd_rank4_sd15_kohya.safetensors",
    "cloneofsimo__lora_disney_sd15_kohya.safetensors",
    "cloneofsimo__lora_kiriko2_sd15_te_kohya.safetensors",
    "lycoris__smart_falcon_4_lokr.safetensors",
    "lycoris__smart_falcon_8_lokr.safetensors",
]


def library_map() -> dict:
    """Many LoRAs → Grassmann Kernel Matrix → heatmap (saved) + clusters (on the node)."""
    g = {}
    slots = {}
    for k, name in enumerate(LIBRARY, 1):
        g[str(k)] = _node("GrassmannLoRALoad", f"LoRA {k}", lora_name=NONE)
        slots[f"lora_{k}"] = [str(k), 0]
    g["20"] = _node("GrassmannLoRAKernelMatrix", "Grassmann Kernel Matrix", kernel="projection-rbf",
                    beta=1.0, alpha=2.0, side="out", top=4, module_filter="", cluster_method="spectral",
                    clusters=0, dbscan_eps=0.5, dbscan_min_samples=2, allow_indefinite=False, kmeans_seed=0, **slots)
    g["21"] = _node("SaveImage", "Save kernel heatmap", images=["20", 0], filename_prefix="grassmann_library_map")
    return g


def two_lora_analysis() -> dict:
    """Two LoRAs → Subspace Similarity (both sides) → heatmap and φ grid (saved)."""
    return {
        "1": _node("GrassmannLoRALoad", "LoRA A", lora_name=NONE),
        "2": _node("GrassmannLoRALoad", "LoRA B", lora_name=NONE),
        "3": _node("GrassmannLoRASimilarity", "LoRA Subspace Similarity", lora_a=["1", 0], lora_b=["2", 0],
                   side="both", top=0, module=""),
        "4": _node("SaveImage", "Save similarity heatmap", images=["3", 0],
                   filename_prefix="grassmann_similarity"),
        "5": _node("SaveImage", "Save φ grid", images=["3", 1], filename_prefix="grassmann_phi_grid"),
    }


MERGE_FIDELITY_MERGES = [("Karcher merge", "4", "karcher"), ("Linear merge", "5", "linear"),
                         ("SVD merge", "6", "svd")]


def merge_fidelity() -> dict:
    """Two LoRAs merged three ways → one prompt and seed per merge → Compare Grid,
    and beside it LoRA Merge Fidelity: how much of each source each merge keeps,
    measured through the model."""
    g = {
        "1": _node("CheckpointLoaderSimple", "Load Checkpoint (SD1.5)", ckpt_name=NONE),
        "2": _node("GrassmannLoRALoad", "LoRA A", lora_name=NONE),
        "3": _node("GrassmannLoRALoad", "LoRA B", lora_name=NONE),
        "10": _node("EmptyLatentImage", "Empty Latent Image", width=SIZE, height=SIZE, batch_size=1),
    }
    _merges(g, ((node_id, method, title) for title, node_id, method in MERGE_FIDELITY_MERGES))
    _rendered_grid(g, [(title, node_id) for title, node_id, _ in MERGE_FIDELITY_MERGES], reference=1)
    g["81"] = _node("SaveImage", "Save grid", images=["80", 0], filename_prefix="grassmann_merge_grid")
    g["90"] = _node("GrassmannLoRAMergeFidelity", "LoRA Merge Fidelity", model=["1", 0], clip=["1", 1],
                    merged_1=["4", 2], prompts=f"{POSITIVE}\n{POSITIVE}", weights="", seed=0, seeds=2,
                    timesteps=3, width=SIZE, height=SIZE, merged_2=["5", 2], merged_3=["6", 2],
                    lora_1=["2", 0], lora_2=["3", 0])
    return g
# The Note of each template: what to pick, and how to make it fast on a CPU.
SIDE_BY_SIDE_NOTE = (
    "Two LoRAs and three merges of them, side by side.\n\n"
    "PICK: an SD1.5 checkpoint in Load Checkpoint, and two SD1.5 LoRAs of yours in LoRA A and "
    "LoRA B (kohya, diffusers, PEFT, LyCORIS, … files from your loras folder). They start empty.\n\n"
    f"SPEED: shipped at the fast size for CPUs: {SIZE}×{SIZE} pixels, {STEPS} steps, five images "
    "(SD1.5's own 512×512 × 20 steps is most of an hour on a small CPU). On a GPU set Empty Latent "
    "Image to 512×512 and the KSamplers to 20–30 steps for full SD1.5 quality.\n\n"
    "LoRA A and LoRA B are applied as they are; Karcher Merge LoRA merges them three ways (karcher = "
    "Grassmann Karcher mean of their subspaces, linear = exact weighted sum, svd = best rank-p "
    "approximation of the sum). Every branch uses the same prompt, seed and sampler; Compare Grid "
    "lays the five images side by side with the mean absolute difference and SSIM to LoRA A under "
    "each. The merge nodes show a fidelity report. Save LoRA writes the Karcher merge into your "
    "loras folder (numbered, never over an earlier one); stock Load LoRA applies it exactly as the "
    "merge node does.")
LIBRARY_MAP_NOTE = (
    "Library map: many LoRAs of one base model compared module by module on the Grassmann "
    "manifold, clustered, and drawn as a matrix in cluster order.\n\n"
    "PICK: a LoRA in each loader (all SD1.5, or all SDXL, …). They start empty. Delete the loaders "
    "you do not need (two is the least); to add one, connect it to the Kernel Matrix's next free "
    "lora_N input (a new one appears each time, up to 16).\n\n"
    "SPEED: no image is generated; six SD1.5 LoRAs take seconds on a CPU. top = 4 compares every "
    "LoRA's four leading directions per module (like for like across ranks, and fast); 0 uses "
    "every direction.")
TWO_LORA_NOTE = (
    "Two-LoRA analysis: how much two LoRAs use the same directions, layer by layer.\n\n"
    "PICK: two LoRAs of the same base model in LoRA A and LoRA B. They start empty.\n\n"
    "SPEED: no image is generated; two SD1.5 LoRAs take seconds on a CPU (SDXL: under a minute). "
    "side = out alone halves the work.\n\n"
    "φ (Hu et al. 2021) is 1 for the same directions and about the chance level (shown beside it) "
    "for unrelated ones. side = both reports the output side (what a layer writes) and the input "
    "side (what it reads). The heatmap has one row per module in depth order, φ on its own scale; "
    "the φ(i, j) grid is for one module (empty 'module' = the most similar one).")


# Where the front end should put the nodes when the UI files are exported:
# node id -> (x, y, width); plus notes (x, y, w, h, text) and groups (title, x, y, w, h).
def _side_by_side_layout() -> dict:
    nodes = {"1": (0, 0, 360), "10": (0, 200, 360), "2": (420, 0, 380), "3": (420, 330, 380),
             "9": (420, 660, 380), "4": (860, 0, 440), "5": (860, 250, 440), "6": (860, 520, 440),
             "7": (860, 1280, 440), "8": (860, 2040, 440), "70": (2560, 0, 260), "80": (2560, 200, 480),
             "81": (3100, 0, 700)}
    for k in range(len(SIDE_BY_SIDE_SOURCES)):
        y = 560 * k
        nodes.update({str(20 + 10 * k): (1360, y, 420), str(21 + 10 * k): (1360, y + 220, 420),
                      str(22 + 10 * k): (1840, y, 340), str(23 + 10 * k): (2240, y, 260)})
    return {"nodes": nodes,
            "notes": [(0, 420, 360, 720, SIDE_BY_SIDE_NOTE)],
            "groups": [("Sources and merges", 400, -60, 940, 2880),
                       ("Same prompt, same seed", 1340, -60, 1180, 2880)]}


def _library_map_layout() -> dict:
    nodes = {str(k): (440 * ((k - 1) % 2), 320 * ((k - 1) // 2), 400) for k in range(1, len(LIBRARY) + 1)}
    nodes.update({"20": (900, 0, 640), "21": (1600, 0, 700)})
    return {"nodes": nodes,
            "notes": [(0, 980, 840, 260, LIBRARY_MAP_NOTE)],
            "groups": []}


def _two_lora_layout() -> dict:
    return {"nodes": {"1": (0, 0, 420), "2": (0, 330, 420), "3": (480, 0, 620), "4": (1160, 0, 640),
                      "5": (1160, 720, 640)},
            "notes": [(0, 680, 420, 420, TWO_LORA_NOTE)],
            "groups": []}


def _merge_fidelity_layout() -> dict:
    nodes = {"1": (0, 0, 360), "10": (0, 200, 360), "2": (420, 0, 380), "3": (420, 330, 380),
             "4": (860, 0, 440), "5": (860, 760, 440), "6": (860, 1520, 440),
             "70": (2560, 0, 260), "80": (2560, 200, 480), "81": (3100, 0, 700), "90": (3100, 820, 760)}
    for k in range(len(MERGE_FIDELITY_MERGES)):
        y = 560 * k
        nodes.update({str(20 + 10 * k): (1360, y, 420), str(21 + 10 * k): (1360, y + 220, 420),
                      str(22 + 10 * k): (1840, y, 340), str(23 + 10 * k): (2240, y, 260)})
    return {"nodes": nodes,
            "notes": [(0, 420, 360, 760,
                       "Merge two LoRAs three ways and check what each merge keeps of each source.\n\n"
                       "PICK: an SD1.5 checkpoint in Load Checkpoint, and two SD1.5 LoRAs of yours in LoRA A "
                       "and LoRA B. They start empty.\n\n"
                       f"SPEED: shipped at the fast size for CPUs, {SIZE}×{SIZE} pixels and {STEPS} steps "
                       "(Empty Latent Image, the KSamplers, and LoRA Merge Fidelity's width/height); on a GPU "
                       "use 512×512 and 20–30 steps.\n\n"
                       "Karcher Merge LoRA merges A and B (karcher, linear, svd); each merge renders the same "
                       "prompt and seed, side by side in Compare Grid.\n\n"
                       "LoRA Merge Fidelity runs the model itself: for each source, under its prompt, "
                       "F = |e_merge - e_source| / |e_source - e_base| (0 = the merge does what the source "
                       "does, 1 = it is as far from the source as the bare model) and the cosine of the two updates, over 2 "
                       "seeds x 3 noise levels. Cost: 2 sources x (2 + 3 merges) x 2 x 3 = 60 denoiser "
                       "evaluations of one latent.\n\n"
                       "One prompt line per source (empty = its trigger words).")],
            "groups": [("Three merges, same prompt and seed", 1340, -60, 1180, 1760)]}


LAYOUTS = {
    SIDE_BY_SIDE: _side_by_side_layout,
    LIBRARY_MAP: _library_map_layout,
    TWO_LORA: _two_lora_layout,
    MERGE_FIDELITY: _merge_fidelity_layout,
}

WORKFLOWS = {
    SIDE_BY_SIDE: side_by_side,
    LIBRARY_MAP: library_map,
    TWO_LORA: two_lora_analysis,
    MERGE_FIDELITY: merge_fidelity,
}

# What a test run picks where the shipped graphs leave the choice to the user: node id -> file.
RUN_FILES = {
    SIDE_BY_SIDE: {"1": CHECKPOINT, "2": LORA_A, "3": LORA_B},
    LIBRARY_MAP: {str(k): name for k, name in enumerate(LIBRARY, 1)},
    TWO_LORA: {"1": LORA_A, "2": LORA_B},
    MERGE_FIDELITY: {"1": CHECKPOINT, "2": LORA_A, "3": LORA_B},
}
# The node whose result each template's thumbnail shows (workflow 1: the saved
# grid, whose preview shows the five images; Compare Grid itself shows the table).
RESULT_NODES = {SIDE_BY_SIDE: "81", LIBRARY_MAP: "20", TWO_LORA: "3", MERGE_FIDELITY: "90"}


def api_path(name: str) -> Path:
    return API_DIR / f"{name}.json"


def runnable(name: str) -> dict:
    """The shipped API graph of workflow ``name`` with the test run's files picked."""
    graph = json.loads(api_path(name).read_text(encoding="utf-8"))
    for node_id, file in RUN_FILES[name].items():
        inputs = graph[node_id]["inputs"]
        key = "ckpt_name" if "ckpt_name" in inputs else "lora_name"
        assert inputs[key] == NONE, f"{name}: node {node_id} ships a file choice ({inputs[key]!r})"
        inputs[key] = file
    return graph


def prepare_loras(dest: str | os.PathLike, fixtures: str | os.PathLike, names=None) -> list[str]:
    """Put the workflows' LoRAs into ``dest``: symlinks to the fixtures ComfyUI reads
    as is, kohya conversions of the others (``python -m core convert``, run in this
    process to save interpreter starts). Returns the names."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from core.cli import main as core_cli

    dest, fixtures = Path(dest), Path(fixtures)
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for name in names or LORAS:
        src, convert = LORAS[name]
        target = dest / name
        if not target.exists():
            if convert:
                if core_cli(["convert", str(fixtures / src), str(target)]) != 0:
                    raise RuntimeError(f"python -m core convert {src} failed")
            else:
                target.symlink_to(fixtures / src)
        done.append(name)
    return done


def write_api_files() -> list[Path]:
    API_DIR.mkdir(parents=True, exist_ok=True)
    out = []
    for name, build in WORKFLOWS.items():
        path = api_path(name)
        path.write_text(json.dumps(build(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_api_files():
        print("wrote", p)
