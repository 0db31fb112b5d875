"""evalsets: the shipped zh_smoke task, local mirrors of hub tasks as lm-eval YAML, and the checks on both."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from pipeline.evaluation.evalsets import LETTERS, ZH_SMOKE, check_mirror, check_tasks, eval_items, write_task_yamls

CMMLU_ROWS = {  # written for this test, in CMMLU's published layout
    "agronomy": [("下列哪种作物属于豆科？", "水稻", "大豆", "小麦", "玉米", "B"),
                 ("种子萌发需要的外界条件不包括？", "适宜温度", "充足空气", "适量水分", "强光照射", "D"),
                 ("“春种一粒粟”中的“粟”指的是？", "小米", "大米", "高粱", "荞麦", "A")],
    "anatomy": [("人体有多少块骨头（成人）？", "106", "306", "206", "156", "C"),
                ("心脏有几个腔？", "两个", "三个", "四个", "五个", "C"),
                ("负责过滤血液、形成尿液的器官是？", "肾脏", "肝脏", "脾脏", "胰腺", "A")],
}


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    from pipeline.core.profiles import load_model
    from pipeline.models.tiny import tiny_model_dir

    return tiny_model_dir(load_model("tiny-qwen2"))


def write_csv(path: Path, rows, header=("", "Question", *LETTERS, "Answer")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([i, *row] for i, row in enumerate(rows))


@pytest.fixture
def cmmlu_mirror(tmp_path: Path) -> Path:
    root = tmp_path / "cmmlu"
    for subject, rows in CMMLU_ROWS.items():
        write_csv(root / "dev" / f"{subject}.csv", rows[:1])
        write_csv(root / "test" / f"{subject}.csv", rows)
    return root


def evaluate(tiny_path: Path, tasks: dict[str, str], out: Path, limit: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = write_task_yamls(tasks, out)
    manager = TaskManager(include_path=str(out))
    check_tasks(names, manager)
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_path},dtype=float32", tasks=names,
                                   task_manager=manager, num_fewshot=0, limit=limit, log_samples=True, batch_size=4,
                                   device="cpu")


def test_zh_smoke_items_are_unique_mostly_chinese_with_letter_answers():
    items = list(eval_items({"zh_smoke": str(ZH_SMOKE)}))
    questions = [text.split("\n")[0] for _, text in items]
    assert 55 <= len(items) <= 65 and len(set(questions)) == len(questions)
    assert {task for task, _ in items} == {"zh_smoke"}
    chinese = [q for q in questions if re.search(r"[\u4e00-\u9fff]", q)]
    assert 0.75 <= len(chinese) / len(questions) < 1  # mostly Chinese, some English
    for split, n in (("dev", 5), ("test", len(items) - 5)):
        with (ZH_SMOKE / split / "zh_smoke.csv").open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == n and list(rows[0]) == ["", "Question", *LETTERS, "Answer"]
        assert {r["Answer"] for r in rows} <= set(LETTERS) and all(r[c].strip() for r in rows for c in LETTERS)
    check_mirror("zh_smoke", ZH_SMOKE)


def test_zh_smoke_runs_in_lm_eval(tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # data paths are absolute: the CWD does not matter
    out = evaluate(tiny_path, {"zh_smoke": str(ZH_SMOKE)}, tmp_path / "tasks", limit=8)
    result = out["results"]["zh_smoke"]
    assert 0.0 <= result["acc,none"] <= 1.0
    samples = out["samples"]["zh_smoke"]
    assert len(samples) == 8
    prompt = samples[0]["arguments"][0][0]
    assert prompt.startswith("以下是单项选择题") and prompt.endswith("\n答案：") and "一年有多少个月？" in prompt


def hellaswag_mirror(root: Path) -> Path:
    rows = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cracks an egg into a bowl.", "ctx_b": "he",
             "ctx": "", "endings": ["whisks it.", "eats the bowl.", "flies away.", "sings."], "source_id": "x",
             "split": "val", "split_type": "indomain", "label": "0"} for i in range(3)]
    root.mkdir(parents=True)
    (root / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def test_cmmlu_mirror_runs_per_subject_under_the_cmmlu_group(tiny_path: Path, tmp_path: Path, cmmlu_mirror: Path):
    mirrors = {"cmmlu": str(cmmlu_mirror), "hellaswag": str(hellaswag_mirror(tmp_path / "hellaswag"))}
    out = evaluate(tiny_path, mirrors, tmp_path / "tasks", limit=2)
    assert out["results"]["hellaswag"]["sample_len"] == 2
    context = out["samples"]["hellaswag"][0]["arguments"][0][0]
    assert context == "Cooking: A man cracks an egg into a bowl. He"  # the built-in preprocessing ran
    assert {"cmmlu", "cmmlu_agronomy", "cmmlu_anatomy"} <= set(out["results"])
    assert "cmmlu" in out["groups"]
    for subject in CMMLU_ROWS:
        assert out["results"][f"cmmlu_{subject}"]["sample_len"] == 2
        targets = [s["target"] for s in out["samples"][f"cmmlu_{subject}"]]
        assert targets == [LETTERS.index(r[-1]) for r in CMMLU_ROWS[subject][:2]]
    prompt = out["samples"]["cmmlu_agronomy"][0]["arguments"][0][0]
    assert prompt.startswith("以下是关于农学的单项选择题")  # the built-in subject description is kept


def test_write_task_yamls_points_at_absolute_local_files(tmp_path: Path, cmmlu_mirror: Path):
    import yaml

    names = write_task_yamls({"cmmlu": str(cmmlu_mirror)}, tmp_path / "tasks")
    assert names == ["cmmlu"]
    group = yaml.safe_load((tmp_path / "tasks" / "cmmlu" / "_cmmlu.yaml").read_text(encoding="utf-8"))
    assert group["group"] == "cmmlu" and group["task"] == ["cmmlu_agronomy", "cmmlu_anatomy"]
    task = yaml.safe_load((tmp_path / "tasks" / "cmmlu" / "cmmlu_anatomy.yaml").read_text(encoding="utf-8"))
    assert task["dataset_path"] == "csv" and task["dataset_name"] is None
    assert task["dataset_kwargs"]["data_files"] == {"test": str(cmmlu_mirror / "test" / "anatomy.csv"),
                                                   "dev": str(cmmlu_mirror / "dev" / "anatomy.csv")}
    assert Path(task["include"]).name == "cmmlu_anatomy.yaml" and Path(task["include"]).is_file()


def test_ceval_mirror_layout(tmp_path: Path):
    import yaml

    root = tmp_path / "ceval"
    header = ("id", "question", *LETTERS, "answer")
    write_csv(root / "val" / "physician_val.csv", [("问题一", "a", "b", "c", "d", "A")], header)
    write_csv(root / "dev" / "physician_dev.csv", [("问题二", "a", "b", "c", "d", "B", "解析")], (*header, "explanation"))
    assert write_task_yamls({"ceval-valid": str(root)}, tmp_path / "tasks") == ["ceval-valid"]
    task = yaml.safe_load((tmp_path / "tasks" / "ceval-valid" / "ceval-valid_physician.yaml").read_text("utf-8"))
    assert task["validation_split"] == "val" and task["fewshot_split"] == "dev"
    assert set(task["dataset_kwargs"]["data_files"]) == {"val", "dev"}
    assert [t for t, _ in eval_items({"ceval-valid": str(root)})] == ["ceval-valid_physician"] * 2


def test_check_mirror_errors_name_task_path_and_columns(tmp_path: Path, cmmlu_mirror: Path):
    with pytest.raises(ValueError, match=r"'cmmlu'.*nowhere.*Question, A, B, C, D, Answer"):
        check_mirror("cmmlu", tmp_path / "nowhere")
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'cmmlu'.*empty.*no files in the expected layout.*test/<subject>.csv"):
        check_mirror("cmmlu", tmp_path / "empty")
    write_csv(cmmlu_mirror / "test" / "anatomy.csv", [("q", "a", "b", "c", "d")], ("", "Question", *LETTERS))
    with pytest.raises(ValueError, match=r"'cmmlu'.*anatomy.csv lacks column\(s\) Answer"):
        check_mirror("cmmlu", cmmlu_mirror)
    write_csv(cmmlu_mirror / "test" / "anatomy.csv", [("q", "a", "b", "c", "d", "E")])
    with pytest.raises(ValueError, match=r"anatomy.csv row 1: Answer is 'E'"):
        check_mirror("cmmlu", cmmlu_mirror)
    (cmmlu_mirror / "dev" / "agronomy.csv").unlink()
    with pytest.raises(ValueError, match=r"subject 'agronomy' has no dev file"):
        check_mirror("cmmlu", cmmlu_mirror)
    with pytest.raises(ValueError, match=r"mirrors are supported for cmmlu, zh_smoke, ceval-valid.*did you mean cmmlu"):
        write_task_yamls({"cmmluu": str(cmmlu_mirror)}, tmp_path / "tasks")


def test_check_tasks_suggests_close_names_and_refuses_hub_only_tasks(tmp_path: Path):
    from lm_eval.tasks import TaskManager

    names = write_task_yamls({"zh_smoke": str(ZH_SMOKE)}, tmp_path / "tasks")
    builtin = TaskManager(include_path=str(tmp_path / "tasks"))  # built-ins + zh_smoke
    check_tasks(["hellaswag", "winogrande", *names], builtin)
    with pytest.raises(ValueError, match=r"unknown task 'hellaswg' \(did you mean hellaswag") as err:
        check_tasks(["hellaswg", "cmmlu_agronomyy"], builtin)
    assert "unknown task 'cmmlu_agronomyy' (did you mean cmmlu_agronomy" in str(err.value)
    with pytest.raises(ValueError, match=r"'cmmlu'.*give a local mirror of 'cmmlu'"):
        check_tasks(["cmmlu"], builtin)
    check_tasks(["cmmlu"], builtin, mirrored=["cmmlu"])  # the caller says it is mirrored (YAMLs written later)
    with pytest.raises(ValueError, match="unknown task 'zh_smok'"):
        check_tasks(["zh_smok"], builtin)


def test_the_config_checks_task_names_against_lm_evals_files_without_loading_them():
    from pipeline.evaluation import evalsets

    text = ('"task": "quoted_key_task"\ngroup: a_group\ntask:\n  - listed_task\n  - task: inline_task\n'
            "tag: [tag_one, tag_two]\ntag:\n  - block_tag\n# task: commented_out\n")
    assert evalsets._names_in(text) == {"quoted_key_task", "a_group", "listed_task", "inline_task", "tag_one",
                                        "tag_two", "block_tag"}
    known = evalsets.known_task_names()  # every name TaskManager indexes on lm-eval 0.4.13 (checked when written)
    assert {"hellaswag", "winogrande", "cmmlu", "ceval-valid", "mmlu", "arc_easy", "acp_bench_hard", "RC_tasks",
            "AraDiCE_ArabicMMLU_high_humanities_history_egy"} <= known  # plain, extension-less include, quoted key
    assert evalsets.unknown_tasks(["hellaswag", "zh_smoke", "cmmlu"], []) == []
    (problem,) = evalsets.unknown_tasks(["zh_smok"], [])
    assert "unknown task 'zh_smok' (did you mean zh_smoke?)" in problem
