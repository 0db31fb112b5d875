"""make mirrors: archives and files in the authors' published layouts, built here from small fixtures, unpacked and
checked into folders evaluate reads; the SHA256 pin refused on a mismatch; the dry run's per-task mirror line.
Nothing is fetched: the downloader is a function handed the files built here."""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import evaluate, mirrors
from pipeline.evaluation import evalsets
from pipeline.evaluation import mirrors as M

LETTERS = ("A", "B", "C", "D")
CMMLU = {"agronomy": [("下列哪种作物属于豆科？", "水稻", "大豆", "小麦", "玉米", "B"),
                      ("种子萌发需要的外界条件不包括？", "适宜温度", "充足空气", "适量水分", "强光照射", "D")],
         "anatomy": [("心脏有几个腔？", "两个", "三个", "四个", "五个", "C")]}
CEVAL = {"physician": [("1", "成人有多少块骨头？", "106", "306", "206", "156", "C")]}


def _csv(header, rows) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def cmmlu_zip(path: Path, prefix: str = "") -> Path:
    """cmmlu_v1_0_1.zip as the authors publish it: dev/<subject>.csv + test/<subject>.csv at the archive's root,
    an unnamed index column first."""
    header = ("", "Question", *LETTERS, "Answer")
    with zipfile.ZipFile(path, "w") as z:
        for subject, rows in CMMLU.items():
            z.writestr(f"{prefix}dev/{subject}.csv", _csv(header, [(i, *r) for i, r in enumerate(rows[:1])]))
            z.writestr(f"{prefix}test/{subject}.csv", _csv(header, [(i, *r) for i, r in enumerate(rows)]))
    return path


def ceval_zip(path: Path) -> Path:
    """ceval-exam.zip: dev|val|test/<subject>_<split>.csv at the root; dev has an explanation, test no answers."""
    header = ("id", "question", *LETTERS, "answer")
    with zipfile.ZipFile(path, "w") as z:
        for subject, rows in CEVAL.items():
            z.writestr(f"dev/{subject}_dev.csv", _csv((*header, "explanation"), [(*r, "解析") for r in rows]))
            z.writestr(f"val/{subject}_val.csv", _csv(header, rows))
            z.writestr(f"test/{subject}_test.csv", _csv(("id", "question", *LETTERS), [r[:-1] for r in rows]))
    return path


def hellaswag_parquet(folder: Path) -> dict[str, Path]:
    """Rowan/hellaswag's parquet conversion: default/<split>/0000.parquet with the hub's columns."""
    rows = {"ind": [1], "activity_label": ["Cooking"], "ctx_a": ["A man cracks an egg."], "ctx_b": ["he"],
            "ctx": ["A man cracks an egg. he"], "endings": [["whisks it.", "eats it.", "flies.", "sings."]],
            "source_id": ["x"], "split": ["val"], "split_type": ["indomain"], "label": ["0"]}
    out = {}
    for split in ("validation", "train"):
        name = f"default/{split}/0000.parquet"
        out[name] = folder / name
        out[name].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows), out[name])
    return out


def source(repo: str, files: dict[str, str | None], unpack: str) -> M.MirrorSource:
    return M.MirrorSource(repo=repo, revision="main", files=files, unpack=unpack)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_shipped_sources_load_and_cover_the_default_mirrored_tasks():
    cfg = M.load()
    assert set(cfg.sources) == {"cmmlu", "ceval-valid", "hellaswag", "winogrande"}
    assert cfg.sources["cmmlu"].repo == "haonan-li/cmmlu" and "cmmlu_v1_0_1.zip" in cfg.sources["cmmlu"].files
    assert cfg.sources["ceval-valid"].repo == "ceval/ceval-exam" and "ceval-exam.zip" in cfg.sources["ceval-valid"].files
    from pipeline.stage.resolve import resolve

    defaults = resolve("evaluate", hw="4090").cfg.mirrors
    assert {t: Path(f) for t, f in defaults.items()} == {t: Path(cfg.folder) / t for t in cfg.sources}


def test_cmmlu_zip_unpacks_into_the_layout_lm_eval_reads_and_records_the_unpinned_sha(tmp_path: Path):
    archive = cmmlu_zip(tmp_path / "cmmlu_v1_0_1.zip")
    seen = []

    def download(repo: str, filename: str, revision: str) -> Path:
        seen.append((repo, filename, revision))
        return archive

    dest = tmp_path / "mirrors" / "cmmlu"
    got = M.fetch("cmmlu", source("haonan-li/cmmlu", {"cmmlu_v1_0_1.zip": None}, "zip"), dest, download)
    assert seen == [("haonan-li/cmmlu", "cmmlu_v1_0_1.zip", "main")]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.csv")) == [
        "dev/agronomy.csv", "dev/anatomy.csv", "test/agronomy.csv", "test/anatomy.csv"]
    evalsets.check_mirror("cmmlu", dest)
    assert sorted(evalsets.mirror_files("cmmlu", dest)) == ["cmmlu_agronomy", "cmmlu_anatomy"]
    assert evalsets.write_task_yamls({"cmmlu": str(dest)}, tmp_path / "tasks") == ["cmmlu"]
    assert (tmp_path / "tasks" / "cmmlu" / "cmmlu_agronomy.yaml").is_file()
    assert got.files == {"cmmlu_v1_0_1.zip": sha(archive)} and got.unpinned == ["cmmlu_v1_0_1.zip"]
    assert "NOT PINNED" in str(got) and sha(archive) in str(got)
    assert M.marker(dest)["sha256"] == {"cmmlu_v1_0_1.zip": sha(archive)}
    assert not list((tmp_path / "mirrors").glob(".*"))  # no work folder left beside it
    assert M.status("cmmlu", dest, True) == ("fetched by make mirrors (haonan-li/cmmlu@main)", None)


def test_ceval_zip_with_a_pinned_sha_and_a_wrapping_folder(tmp_path: Path):
    archive = ceval_zip(tmp_path / "ceval-exam.zip")
    dest = tmp_path / "ceval-valid"
    got = M.install("ceval-valid", source("ceval/ceval-exam", {"ceval-exam.zip": sha(archive)}, "zip"),
                    {"ceval-exam.zip": archive}, dest)
    assert got.unpinned == [] and "matches the pin" in str(got)
    assert sorted(evalsets.mirror_files("ceval-valid", dest)) == ["ceval-valid_physician"]
    evalsets.check_mirror("ceval-valid", dest)
    wrapped = cmmlu_zip(tmp_path / "wrapped.zip", prefix="cmmlu_v1_0_1/")  # a release zipped inside one folder
    M.install("cmmlu", source("r", {"wrapped.zip": None}, "zip"), {"wrapped.zip": wrapped}, tmp_path / "cmmlu")
    assert (tmp_path / "cmmlu" / "test" / "anatomy.csv").is_file()


def test_a_sha256_mismatch_is_refused_and_keeps_the_old_mirror(tmp_path: Path):
    good = cmmlu_zip(tmp_path / "good.zip")
    dest = tmp_path / "cmmlu"
    M.install("cmmlu", source("r", {"cmmlu_v1_0_1.zip": sha(good)}, "zip"), {"cmmlu_v1_0_1.zip": good}, dest)
    changed = cmmlu_zip(tmp_path / "changed.zip", prefix="x/")
    with pytest.raises(ValueError, match=f"SHA256 {sha(changed)} does not match the pinned {sha(good)}"):
        M.install("cmmlu", source("r", {"cmmlu_v1_0_1.zip": sha(good)}, "zip"), {"cmmlu_v1_0_1.zip": changed}, dest)
    assert M.marker(dest)["sha256"] == {"cmmlu_v1_0_1.zip": sha(good)}  # untouched


def test_archives_that_escape_or_lack_the_layout_are_refused(tmp_path: Path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.csv", "x")
    with pytest.raises(ValueError, match="outside the mirror folder"):
        M.install("cmmlu", source("r", {"evil.zip": None}, "zip"), {"evil.zip": evil}, tmp_path / "a")
    assert not (tmp_path / "outside.csv").exists()
    odd = tmp_path / "odd.zip"
    with zipfile.ZipFile(odd, "w") as z:
        z.writestr("readme.txt", "no csv here")
    with pytest.raises(ValueError, match="not in the layout evaluate reads.*expected test/<subject>.csv"):
        M.install("cmmlu", source("r", {"odd.zip": None}, "zip"), {"odd.zip": odd}, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="not a zip archive"):
        M.install("cmmlu", source("r", {"odd.zip": None}, "zip"), {"odd.zip": _text(tmp_path / "plain.zip")},
                  tmp_path / "c")


def _text(path: Path) -> Path:
    path.write_text("not a zip", encoding="utf-8")
    return path


def test_hub_parquet_files_are_copied_in_their_repo_paths(tmp_path: Path):
    files = hellaswag_parquet(tmp_path / "hub")
    dest = tmp_path / "hellaswag"
    M.install("hellaswag", source("Rowan/hellaswag", dict.fromkeys(files), "copy"), files, dest)
    splits = evalsets.mirror_files("hellaswag", dest)["hellaswag"]
    assert [p.relative_to(dest).as_posix() for p in splits["validation"]] == ["default/validation/0000.parquet"]
    evalsets.check_mirror("hellaswag", dest)


def test_dry_run_says_per_task_whether_its_mirror_is_there(tmp_path: Path, mlflow_store, capsys):
    fetched = tmp_path / "fetched"
    M.install("cmmlu", source("haonan-li/cmmlu", {"z.zip": None}, "zip"), {"z.zip": cmmlu_zip(tmp_path / "z.zip")},
              fetched)
    own = tmp_path / "own"
    for split in ("val", "dev"):
        (own / split).mkdir(parents=True)
        (own / split / f"physician_{split}.csv").write_bytes(_csv(("id", "question", *LETTERS, "answer"),
                                                                 CEVAL["physician"]))
    argv = ["--hw", "cpu", "--dry-run", "true", "--set", "tasks=[cmmlu, ceval-valid, hellaswag, winogrande]",
            "--set", f"mirrors={{cmmlu: {fetched}, ceval-valid: {own}, hellaswag: {tmp_path / 'nowhere'}}}"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    assert f"mirror of cmmlu: {fetched} [fetched by make mirrors (haonan-li/cmmlu@main)]" in out
    assert f"mirror of ceval-valid: {own} [mirror present]" in out
    assert "mirror of hellaswag: " in out and "[missing: run make mirrors (make eval DRY_RUN=0 runs it first)]" in out
    assert "task winogrande: lm-eval's own hub dataset [downloaded by lm-eval at run time]" in out


def test_the_command_keeps_a_present_mirror_and_names_the_source_when_offline(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # HF_HUB_OFFLINE=1 (conftest): nothing is fetched
    present = tmp_path / "cmmlu"
    M.install("cmmlu", source("haonan-li/cmmlu", {"z.zip": None}, "zip"), {"z.zip": cmmlu_zip(tmp_path / "z.zip")},
              present)
    sets = ["--hw", "cpu", "--set", "tasks=[cmmlu, ceval-valid]",
            "--set", f"mirrors={{cmmlu: {present}, ceval-valid: {tmp_path / 'ceval'}}}"]
    assert mirrors.main([*sets, "--if-missing"]) == 1
    captured = capsys.readouterr()
    assert f"cmmlu: present in {present} (fetched from haonan-li/cmmlu@main)" in captured.out
    assert "ceval-valid: could not download ceval-exam.zip from ceval/ceval-exam@main" in captured.err
    assert "HF_ENDPOINT" in captured.err and not (tmp_path / "ceval").exists()
    assert mirrors.main(["--hw", "cpu"]) == 0 and "nothing to fetch" in capsys.readouterr().out
    assert mirrors.main(["--hw", "cpu", "--tasks", "arc_easy"]) == 2


def test_make_eval_runs_the_mirrors_step_first_only_for_a_real_run():
    import subprocess

    from pipeline.core.paths import ROOT

    def steps(*args: str) -> list[str]:
        out = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.setup-stamp", *args], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if line.strip() and not line.startswith("make[")]

    real = steps("eval", "DRY_RUN=0", "HW=4090")
    assert "-m pipeline.mirrors --hw '4090'" in real[0] and real[0].endswith("--if-missing")
    assert "-m pipeline.evaluate" in real[1] and "--check" in real[1]
    assert not any("pipeline.mirrors" in line for line in steps("eval"))
    assert "-m pipeline.mirrors" in steps("mirrors")[0]
