"""`python -m core inspect`: text for people, --json for programs."""
import json

import pytest

from core import cli
from core.factored import dense_svd
from core.save import save_kohya
from core.synthetic import random_lora
from tests.lora_reference import one_thread  # noqa: F401 (autouse fixture)



def run_json(capsys, *args):
    rc = cli.main(["inspect", "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def test_json_report_of_a_real_file(capsys, real_loras_dir):
    path = real_loras_dir / "cloneofsimo__lora_illust_sd2.pt"
    rc, doc = run_json(capsys, str(path), "--top", "3")
    assert rc == 0
    (info,) = doc["files"]
    assert (info["format"], info["family"], info["family_label"]) == ("cloneofsimo-pt", "sd2", "SD2.x")
    assert "1024" in info["family_evidence"]
    assert info["modules"] == 128 and info["parts"] == {"unet": 128} and info["ranks"] == [4]
    assert info["dtypes"] == {"float32": 128} and info["kinds"] == {"lora": 128}
    assert len(info["dead"]) == 32 and all(n.endswith("to_out_0") for n in info["dead"])
    details = info["module_details"]
    assert len(details) == 128
    live = next(d for d in details if not d["dead"])
    assert len(live["top_singular_values"]) == 3 and live["effective_rank"] == 4
    assert live["group"] == "down0 attn1" and live["shape"] == [320, 320]


def test_json_singular_values_match_a_dense_svd(capsys, tmp_path):
    lora = random_lora("sd1", rank=6, seed=4, conv=True, limit=12, alpha=3.0)
    path = tmp_path / "small.safetensors"
    save_kohya(lora, str(path), extra_metadata={"ss_output_name": "small"})
    rc, doc = run_json(capsys, str(path), "--top", "6")
    (info,) = doc["files"]
    assert info["metadata"]["ss_output_name"] == "small" and info["alphas"] == [3.0]
    assert info["conv_modules"] == sum(m.is_conv for m in lora.modules.values()) > 0
    for d in info["module_details"]:
        ref = dense_svd(lora.modules[d["name"]]).S
        assert d["top_singular_values"] == pytest.approx(ref[:6].tolist(), rel=1e-5)
        assert d["scale"] == pytest.approx(0.5) and d["rank"] == 6


def test_text_report_and_partial_failure(capsys, tmp_path, real_loras_dir):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    good = real_loras_dir / "lycoris__smart_falcon_4_lokr.safetensors"
    rc = cli.main(["inspect", str(good), str(bad)])
    out, err = capsys.readouterr()
    assert rc == 2                                   # one file failed …
    assert "format    lycoris-lokr" in out          # … the other was still reported
    assert "family    SD1.x" in out and "modules   350: unet 278, te 72" in out
    assert "dead      3:" in out and "ss_network_module = lycoris.kohya" in out
    assert "lora_unet_down_blocks_1_resnets_0_conv1" in out and "640×320×3×3" in out
    assert err.count("error: ") == 1 and str(bad) in err
    rc = cli.main(["inspect", "--summary", str(good)])
    assert rc == 0 and "top σ" not in capsys.readouterr().out
    rc, doc = run_json(capsys, str(bad))
    assert rc == 2 and "error" in doc["files"][0]
