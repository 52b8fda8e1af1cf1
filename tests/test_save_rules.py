"""core.save's rules for every output (LoRA, JSON, PNG): atomic, no overwrite
unless asked (atomically: of two writers exactly one wins), temporaries no
host lists as LoRAs and stale ones removed, mode 0666 & ~umask, never outside
the folder, never onto an input or another output, never a non-finite value;
and the CLI checks all of that before any work."""
import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import cli, save
from core.errors import LoraError
from core.formats import load_lora
from core.save import atomic_write, clean_relative_name, numbered_name, save_kohya, write_text
from core.synthetic import random_lora
from tests.cli_run import ROOT, assert_one_line_error, call_core, core_env

HOST_LISTED = (".safetensors", ".ckpt", ".pt", ".pt2", ".bin", ".pth", ".pkl", ".sft", ".json", ".png")


def small(seed=0):
    return random_lora("sd1", rank=2, seed=seed, limit=3)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_mode_is_0666_minus_umask_for_lora_json_png(tmp_path, umask022):
    from PIL import Image

    from core.plot import image_to_png
    paths = [save_kohya(small(), str(tmp_path / "a.safetensors")),
             write_text(str(tmp_path / "r.json"), "{}"),
             image_to_png(Image.new("RGB", (4, 4)), str(tmp_path / "h.png"))]
    assert [oct(os.stat(p).st_mode & 0o777) for p in paths] == ["0o644"] * 3
    os.umask(0o002)
    p = save_kohya(small(), str(tmp_path / "b.safetensors"))
    assert os.stat(p).st_mode & 0o777 == 0o664
    # overwriting gives the new file the same ordinary mode
    os.umask(0o022)
    p = save_kohya(small(1), p, overwrite=True)
    assert os.stat(p).st_mode & 0o777 == 0o644


def test_written_safetensors_round_trips_every_dtype(tmp_path):
    lora = random_lora("sd1", rank=3, seed=2, limit=4, conv=True)
    for name, dt in save.DTYPES.items():
        p = save_kohya(lora, str(tmp_path / f"{name}.safetensors"), dtype=dt)
        got, want = load_file(p), save.kohya_tensors(lora, dt)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert load_lora(p).format == "kohya"


def test_no_overwrite_unless_asked(tmp_path):
    p = save_kohya(small(), str(tmp_path / "a.safetensors"))
    before = Path(p).read_bytes()
    with pytest.raises(LoraError, match="exists"):
        save_kohya(small(1), p)
    assert Path(p).read_bytes() == before
    save_kohya(small(1), p, overwrite=True)
    assert Path(p).read_bytes() != before
    assert os.listdir(tmp_path) == ["a.safetensors"]     # no temporaries left


def test_two_concurrent_writers_of_one_name_exactly_one_wins(tmp_path):
    """Both writers pass the existence check (they wait inside write() until
    both are there); the name is still given to exactly one."""
    target = str(tmp_path / "out.json")
    barrier = threading.Barrier(2)
    results = []

    def writer(text):
        def write(tmp):
            Path(tmp).write_text(text)
            barrier.wait(timeout=10)
        try:
            atomic_write(target, write)
            results.append(("won", text))
        except LoraError as err:
            results.append(("lost", str(err)))

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if r[0] == "won"]
    assert len(won) == 1 and "exists" in [r for r in results if r[0] == "lost"][0][1]
    assert Path(target).read_text() == won[0][1]
    assert os.listdir(tmp_path) == ["out.json"]


def test_temporaries_are_not_listed_as_loras_and_stale_ones_go(tmp_path):
    seen = []

    def write(tmp):
        seen.append(os.path.basename(tmp))
        Path(tmp).write_bytes(b"x")
    atomic_write(str(tmp_path / "m.safetensors"), write)
    tmp_name = seen[0]
    assert tmp_name.startswith(".") and not tmp_name.lower().endswith(HOST_LISTED)
    # what kill -9 leaves: an old temporary (removed) and a young one (a live writer's; kept)
    stale, young = tmp_path / ".x.safetensors.partial-dead0001", tmp_path / ".y.safetensors.partial-live0001"
    stale.write_bytes(b"half")
    young.write_bytes(b"half")
    old = time.time() - 2 * save.STALE_AFTER_S
    os.utime(stale, (old, old))
    save_kohya(small(), str(tmp_path / "n.safetensors"))
    assert not stale.exists() and young.exists()


def test_killed_writer_leaves_no_file_under_the_name(tmp_path):
    """A writer that dies inside write() leaves nothing under the final name and
    removes its temporary (a real kill -9 leaves it, cleaned as above)."""
    def write(tmp):
        Path(tmp).write_bytes(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(tmp_path / "k.safetensors"), write)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied")])
def test_disk_full_or_read_only_is_one_line_naming_the_file(tmp_path, err, words):
    def write(tmp):
        raise OSError(err, os.strerror(err))
    target = tmp_path / "f.safetensors"
    with pytest.raises(LoraError) as exc:
        atomic_write(str(target), write)
    assert str(target) in str(exc.value) and words in str(exc.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(LoraError, match="permission denied"):
            save_kohya(small(), str(folder / "a.safetensors"))
    finally:
        folder.chmod(0o755)


def test_output_that_is_a_folder_or_too_long(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(LoraError, match="folder"):
        save_kohya(small(), str(tmp_path / "d.safetensors"))
    with pytest.raises(LoraError, match="too long"):
        save_kohya(small(), str(tmp_path / ("x" * 300 + ".safetensors")))


def test_numbered_names_count_like_save_image(tmp_path):
    assert numbered_name(str(tmp_path), "m", ".safetensors") == "m_00001.safetensors"
    for name in ("m_00001.safetensors", "m_00007.safetensors", "m_7.safetensors", "mm_00009.safetensors",
                 "m_00008.json"):
        (tmp_path / name).write_bytes(b"")
    assert numbered_name(str(tmp_path), "m", ".safetensors") == "m_00008.safetensors"
    p = save_kohya(small(), str(tmp_path / "m.safetensors"), numbered=True)
    assert os.path.basename(p) == "m_00008.safetensors"


@pytest.mark.parametrize("name", ["a\x00b", "..\\..\\x", "C:\\Windows\\x", "C:x", "~/x", ".", "sub/", "a\nb",
                                  "../x", "/etc/x", "a/../../x", "", "a|b", "dir /x", "x" * 256])
def test_every_spelling_of_a_bad_name_is_refused(name):
    with pytest.raises(LoraError) as err:
        clean_relative_name(name)
    assert "\n" not in str(err.value)


def test_good_names_are_normalised():
    assert clean_relative_name("  ./sub//x.safetensors ") == "sub/x.safetensors"
    assert clean_relative_name("sub\\x.safetensors") == "sub/x.safetensors"
    assert clean_relative_name("ünï cödé.safetensors") == "ünï cödé.safetensors"


def test_non_finite_or_out_of_range_is_refused_with_the_reason(tmp_path):
    lora = small()
    name = next(iter(lora.modules))
    lora.modules[name].up[0, 0] = 1e6
    with pytest.raises(LoraError, match="does not fit float16"):
        save_kohya(lora, str(tmp_path / "a.safetensors"), dtype=torch.float16)
    save_kohya(lora, str(tmp_path / "a.safetensors"), dtype=torch.float32)   # fp32 holds it
    lora.modules[name].down[0, 0] = float("inf")
    with pytest.raises(LoraError, match="non-finite") as err:
        save_kohya(lora, str(tmp_path / "b.safetensors"))
    assert err.value.key == f"{name}.lora_down.weight"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


# ------------------------------------------------------------------ CLI: checked before any work

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    a = random_lora("sd1", rank=2, seed=1, limit=4)
    return [save_kohya(a, str(folder / "A.safetensors")),
            save_kohya(random_lora("sd1", rank=2, seed=2, limit=4), str(folder / "B.safetensors"))]


def test_outputs_onto_inputs_or_each_other_are_refused_and_nothing_changes(pair, tmp_path, monkeypatch):
    a, b = pair
    before = [Path(p).read_bytes() for p in pair]
    out = str(tmp_path / "m.safetensors")
    for argv in (["similarity", a, b, "--json", a], ["similarity", a, b, "--heatmap", b, "--overwrite"],
                 ["kernel", a, b, "--heatmap", b], ["merge", a, b, "-o", out, "--report", a],
                 ["merge", a, b, "-o", a, "--overwrite"], ["merge", a, b, "-o", out, "--report", out],
                 ["convert", a, a, "--overwrite"]):
        assert cli.main(argv) == 2, argv
    assert [Path(p).read_bytes() for p in pair] == before and os.listdir(tmp_path) == []


def test_merge_output_checked_before_any_work(pair, tmp_path, monkeypatch, capsys):
    import core.formats
    a, b = pair
    calls = []
    monkeypatch.setattr(core.formats, "load_lora", lambda p: calls.append(p))
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    cases = {"exists": ["-o", str(existing)],
             "name it": ["-o", str(tmp_path / "out.pt")],
             "does not exist": ["-o", str(tmp_path / "nope" / "out.safetensors")],
             "is a folder": ["-o", str(tmp_path)],
             ".json": ["-o", str(tmp_path / "o.safetensors"), "--report", str(tmp_path / "r.txt")]}
    for words, extra in cases.items():
        assert cli.main(["merge", a, b, *extra]) == 2
        assert words in capsys.readouterr().err, words
    assert calls == [] and existing.read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["exists.safetensors"]


def test_similarity_grid_ambiguous_lists_candidates_before_writing(pair, tmp_path):
    a, b = pair
    out = tmp_path / "r.json"
    run = call_core("similarity", a, b, "--json", str(out), "--grid", "attn1")
    assert_one_line_error(run, "ambiguous", "lora_unet_")
    assert not out.exists()
    run = call_core("similarity", a, b, "--json", str(out), "--grid", "no_such_module")
    assert_one_line_error(run, "not shared", "no_such_module")
    assert not out.exists()
    # a unique part of a name is enough
    name = next(iter(load_lora(a).modules))
    run = call_core("similarity", a, b, "--grid", name[-30:])
    assert run.returncode == 0 and name in run.stdout


def test_summary_prints_the_ranking_score(pair):
    run = call_core("similarity", *pair)
    assert run.returncode == 0 and "score = (φ − chance) / (1 − chance)" in run.stdout
    scores = [float(line.split("score")[1].split()[0]) for line in run.stdout.splitlines()
              if line.startswith("    ") and " score " in line]
    most = scores[:len(scores) // 2]
    assert most == sorted(most, reverse=True)


def test_progress_only_on_a_terminal():
    import io

    from core.progress import terminal_progress

    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert terminal_progress("x", io.StringIO()) is None
    stream = Tty()
    progress = terminal_progress("merging", stream)
    for i in range(1, 4):
        progress(i, 3)
    text = stream.getvalue()
    assert text.startswith("\rmerging: 1/3") and text.endswith("3/3 modules (100 %)\n")


def test_json_report_is_not_replaced_without_overwrite(pair, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("mine")
    assert_one_line_error(call_core("similarity", *pair, "--json", str(out)), "exists", str(out))
    assert out.read_text() == "mine"
    assert call_core("similarity", *pair, "--json", str(out), "--overwrite").returncode == 0
    assert json.loads(out.read_text())["summary"]["shared"] == 4


# ------------------------------------------------------------------ a real full / read-only disk
# The tests above raise the OSError by hand; these make the kernel refuse the
# write: a 64 KiB tmpfs (ENOSPC) or a read-only one (EROFS) mounted in a user
# and mount namespace (`unshare -rm`, no root needed where user namespaces
# are allowed), and a 0555 folder written by a process without capabilities
# (`unshare -U --map-user`: uid 1000 in the namespace, so even root's
# CAP_DAC_OVERRIDE is gone). Each runs the CLI; the mounts die with it.

def _unshare_works(*flags) -> bool:
    try:
        return subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A LoRA whose copy cannot fit in 64 KiB."""
    path = save_kohya(random_lora("sd1", rank=8, seed=3, limit=12), str(tmp_path_factory.mktemp("src") / "s.safetensors"))
    assert os.path.getsize(path) > 4 * 64 * 1024
    return path


@pytest.mark.parametrize("options, words", [("size=64k", "disk is full"), ("ro,size=64k", "read-only")])
def test_a_real_full_or_read_only_disk_is_one_line_and_leaves_nothing(tmp_path, big_source, options, words):
    if not _unshare_works("-rm"):
        pytest.skip("no user+mount namespaces here (unshare -rm): cannot mount a small tmpfs without root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; '
              '"$3" -m core convert "$4" "$2/out.safetensors"; rc=$?; echo "left: $(ls -A "$2")"; exit $rc')
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", options, str(mnt), sys.executable,
                          big_source], capture_output=True, text=True, cwd=ROOT, timeout=180, env=core_env())
    assert run.returncode != 99, f"mount failed: {run.stderr}"
    assert_one_line_error(run, str(mnt / "out.safetensors"), words)
    assert run.stdout.strip() == "left:", run.stdout     # no temporary, no partial file


def test_a_real_read_only_folder_refuses_a_process_without_privileges(tmp_path, big_source):
    if os.geteuid() != 0:
        pytest.skip("not root: test_read_only_folder covers this with a plain chmod")
    if not _unshare_works("-U", "--map-user=1000", "--map-group=1000"):
        pytest.skip("no user namespaces here (unshare -U): cannot drop root's override of folder modes")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        run = subprocess.run(["unshare", "-U", "--map-user=1000", "--map-group=1000", sys.executable, "-m",
                              "core", "convert", big_source, str(folder / "out.safetensors")],
                             capture_output=True, text=True, cwd=ROOT, timeout=180, env=core_env())
        assert_one_line_error(run, str(folder / "out.safetensors"), "permission denied")
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)
