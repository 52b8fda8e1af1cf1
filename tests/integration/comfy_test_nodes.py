"""Test-only ComfyUI nodes (linked into the test server's custom_nodes by conftest.py,
never shipped): they hand back what a graph computed, for the tests to check.

* GrassmannTestShowString: a STRING (e.g. the fidelity node's JSON) in the history.
* GrassmannTestWeightDigest: a digest of the weights ComfyUI actually runs with, after
  its own LoRA patching. With random weights the UNet output is ~1e-4 of unit scale,
  so a LoRA moves 64×64 8-bit images by well under one level: images alone cannot
  tell whether two patched models are the same. The digest can, bit for bit.
* GrassmannTestPatchCount: how many weights ComfyUI's LoRA loading patched (cheap:
  nothing is loaded).
"""
import hashlib
import json


class GrassmannTestShowString:
    CATEGORY = "testing"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True})}}

    def run(self, text):
        return {"ui": {"string": [text]}}


class GrassmannTestWeightDigest:
    CATEGORY = "testing"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",)}}

    def run(self, model, clip):
        import comfy.model_management as mm
        out = {}
        for part, patcher in (("model", model), ("clip", clip.patcher)):
            mm.load_models_gpu([patcher], force_full_load=True)
            sd = patcher.model.state_dict()
            keys = sorted(patcher.patches)
            h = hashlib.sha256()
            for k in keys:
                h.update(k.encode())
                h.update(sd[k].detach().float().cpu().contiguous().numpy().tobytes())
            out[part] = f"{len(keys)} patched, sha256 {h.hexdigest()}"
        return {"ui": {"digest": [out]}, "result": (json.dumps(out),)}


class GrassmannTestPatchCount(GrassmannTestWeightDigest):
    def run(self, model, clip):
        out = {"model": len(model.patches), "clip": len(clip.patcher.patches)}
        return {"ui": {"patches": [out]}, "result": (json.dumps(out),)}


NODE_CLASS_MAPPINGS = {"GrassmannTestShowString": GrassmannTestShowString,
                       "GrassmannTestWeightDigest": GrassmannTestWeightDigest,
                       "GrassmannTestPatchCount": GrassmannTestPatchCount}
