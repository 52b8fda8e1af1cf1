"""Merging LoRAs into one real, loadable LoRA, with a fidelity report.

Sources ΔW_k = s_k·up_k·down_k with user weights w_k (kohya/ComfyUI meaning:
weight 1 = the LoRA at strength 1). Every method works module by module on
the modules the sources share, from factors. One idea per file:

    plan       which modules, weights, ranks; the options a method reads
    basis      one module's job: the sources' SVDs in frames of the stacked factors
    methods    the method table (name → rule, description, paper, parameters)
    exact      linear / concat and svd
    means      karcher (Grassmann means of the column and row spaces)
    ties_dare  TIES and DARE on the dense ΔW
    fidelity   one merged module measured against its sources
    report     the per-module and per-group fidelity report
    result     the merged LoRA, its naming and recipe
    run        the streaming run loop and merge()
"""
from .methods import TABLE, Method, Param, describe, get, names, register
from .report import MergeReport, ModuleReport
from .result import NAMINGS, RECIPE_KEY, MergeResult, file_sha256
from .run import merge
from .ties_dare import dare_combine, ties_combine, ties_threshold, top_singular

METHODS = names()

__all__ = ["METHODS", "NAMINGS", "RECIPE_KEY", "TABLE", "Method", "Param", "MergeReport", "MergeResult",
           "ModuleReport", "merge", "describe", "get", "names", "register", "ties_threshold", "ties_combine",
           "dare_combine", "top_singular", "file_sha256"]
