"""The prepare stage: text hygiene, every parser on the fixtures, the whole stage, its errors and its outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from pipeline import prepare
from pipeline.core.errors import ConfigError
from pipeline.core.paths import ROOT
from pipeline.data import sources
from pipeline.data.sources import SOURCES, Tally, records
from pipeline.data.sources.base import BadRow, SourceConfig, rowwise
from pipeline.data.sources.files import list_files
from pipeline.data.sources.hh_rlhf import hh_turns
from pipeline.data.text import classify, dedup_key, normalise, script
from pipeline.stage.resolve import resolve


def test_normalise_keeps_chinese_punctuation_and_superscripts():
    assert normalise("你好，世界！（测试）x²") == "你好，世界！（测试）x²"


def test_normalise_maps_only_fullwidth_letters_digits_and_ideographic_space():
    assert normalise("ＡＢＣ　ｘｙｚ１２３：") == "ABC xyz123："


def test_normalise_compresses_spaces_trims_line_ends_and_keeps_lines():
    assert normalise("  第一行   有空格  \r\n第二行\t\t结束  \n\n\n第三行 ") == "第一行 有空格\n第二行 结束\n\n\n第三行"


def test_normalise_leaves_fenced_code_byte_for_byte():
    code = "```python\nfor i in  range(3):   \n    print( ｉ )\n```"
    assert normalise(f"代码如下：  \n{code}\n完毕　") == f"代码如下：\n{code}\n完毕"
    unclosed = "```\n  x  =  1  "
    assert normalise(f"看：\n{unclosed}") == f"看：\n{unclosed}".rstrip()


def test_dedup_key_folds_width_case_and_whitespace_but_the_text_does_not():
    a, b = "Hello，ＷＯＲＬＤ\n\n  你好 ", "hello,world 你好"
    assert dedup_key(a) == dedup_key(b) == "hello,world 你好"
    assert normalise(a) != normalise(b)


@pytest.mark.parametrize("text,lang", [
    ("你好，世界！今天天气很好。", "zh"),
    ("The quick brown fox jumps over the lazy dog.", "en"),
    ("使用 Python 和 PyTorch 训练模型", "zh"),
    ("Use 中文 in one word of a long English sentence here", "en"),
    ("こんにちは、世界。日本語の文章です。", "other"),
    ("안녕하세요, 세계", "other"),
    ("Привет, как дела?", "other"),
    ("", "other"),
])
def test_classify_by_character_classes(text, lang):
    assert classify(text) == lang


def test_code_blocks_are_left_out_of_the_language_ratio():
    answer = "下面是解法：\n```python\ndef two_sum(nums, target):\n    seen = {}\n    return seen\n```\n复杂度是线性的。"
    assert script(answer).latin_words == 0 and classify(answer) == "zh"


def test_the_datasets_own_language_tag_wins():
    assert [classify("Hello", tag) for tag in ("zh", "zh-TW", "en", "ja")] == ["zh", "zh", "en", "other"]


def test_han_share():
    assert script("中文 text").han_share == pytest.approx(2 / 3)
    assert script("").han_share == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Parsers on the fixtures (tests/fixtures/README.md says what each row is for)
# ---------------------------------------------------------------------------------------------------------------
FIXTURES = ROOT / "tests" / "fixtures"


def parse(name: str, **options) -> tuple[list[dict], Counter]:
    src = SourceConfig(name=name, hub_id="x", revision="x", path=str(FIXTURES / name), **options)
    tally = Tally()
    recs = list(records(src, list_files(FIXTURES / name, src, SOURCES[name]), tally))
    return recs, tally.skipped


def texts(turns: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"][:12]) for m in turns]


@pytest.mark.parametrize("name,sft,pref,skipped", [
    ("oasst1", 5, 7, {"message without id, text or role": 1, "deleted message (with its subtree)": 3,
                      "failed review (with its subtree)": 3, "message whose parent is missing": 1}),
    ("coig", 18, 0, {}),  # the empty-output row parses; the hygiene step drops it
    ("coig_pc_core", 8, 0, {"`output` missing or not text": 1}),
    ("shp", 0, 6, {"`human_ref_B` missing or not text": 1, "non-UTF-8 bytes": 1}),
    ("ultrafeedback_binarized", 0, 5, {"tie (score_chosen == score_rejected)": 1,
                                       "`chosen` is not a list of role/content messages": 1}),
    ("hh_rlhf", 0, 7, {"chosen and rejected part before the last reply": 1,
                       "transcript is not Human/Assistant turns": 1}),
    ("pku_saferlhf", 0, 7, {}),  # the row without better_response_id is fine under chosen_by: safer
])
def test_each_parser_gives_the_expected_rows_and_counts_its_skips(name, sft, pref, skipped):
    recs, skip = parse(name)
    assert Counter(r["kind"] for r in recs) == Counter({k: v for k, v in (("sft", sft), ("pref", pref)) if v})
    assert dict(skip) == skipped
    assert all(r["source"] == name for r in recs)


def short(message_id: str) -> str:
    """`7a3cTTTT-0000-4000-8000-00000000000N` → `T/N`, as tests/fixtures/README.md writes them."""
    return f"{int(message_id[4:8])}/{int(message_id[-12:])}"


def pairs_of(recs: list[dict]) -> dict[str, list[str]]:
    """prompter node → its pairs as `better>worse`."""
    out: dict[str, list[str]] = {}
    for r in recs:
        if r["kind"] == "pref":
            node, pair = r["source_id"].split(":")
            out.setdefault(short(node), []).append(">".join(short(m) for m in pair.split(">")))
    return {k: sorted(v) for k, v in sorted(out.items())}


def test_oasst1_follows_the_best_ranked_path_and_pairs_every_ranked_sibling():
    recs, _ = parse("oasst1")
    paths = sorted(short(r["source_id"].split("/")[1]) for r in recs if r["kind"] == "sft")
    assert paths == ["1/6", "2/1", "3/1", "4/4", "5/4"]  # the last message of each tree's best path
    zh = next(r for r in recs if r["kind"] == "sft" and short(r["source_id"].split("/")[1]) == "1/6")
    assert [m["role"] for m in zh["messages"]] == ["user", "assistant", "user", "assistant"]
    assert zh["messages"][1]["content"].startswith("大语言模型是在海量文本上训练出来的")  # 1/1, rank 0
    assert zh["lang_hint"] == "zh"
    # every (better, worse) pair by rank; the null-ranked 1/4, the deleted 4/1 and the review-failed 5/1 never appear
    assert pairs_of(recs) == {"1/0": ["1/1>1/2", "1/1>1/3", "1/2>1/3"], "1/5": ["1/6>1/7"], "2/0": ["2/1>2/2"],
                              "3/0": ["3/1>3/2"], "4/0": ["4/4>4/5"]}
    follow_up = next(r for r in recs if r["kind"] == "pref" and short(r["source_id"].split(":")[0]) == "1/5")
    assert [m["role"] for m in follow_up["prompt"]] == ["user", "assistant", "user"]  # all earlier turns


def test_coig_reads_every_file_layout_with_one_instruction_rule():
    recs, _ = parse("coig")
    users = [r["messages"][0]["content"] for r in recs]
    with_input = "给定一个句子，判断它的情感是正面还是负面。\n饭菜是凉的，服务员还把我们晾了二十分钟。"
    assert with_input in users  # instruction + "\n" + input
    assert "写一首关于秋天的短诗。" in users  # empty input: no trailing "\n"
    chats = sorted(len(r["messages"]) for r in recs if "counterfactural" in r["meta"])
    assert chats == [4, 6]  # the tar's two multi-round dialogues
    code = next(r for r in recs if "```python" in r["messages"][-1]["content"])
    assert "\n    " in code["messages"][-1]["content"]  # indentation inside the code block survives parsing


def test_shp_chosen_follows_labels_and_min_score_ratio_filters():
    recs, _ = parse("shp")
    by_post = {r["group"]: r for r in recs}
    assert by_post["x1cu02"]["chosen"][0]["content"] != by_post["x1cu02"]["rejected"][0]["content"]
    raw = [json.loads(line) for line in (FIXTURES / "shp/askculinary/train.json").read_text("utf-8").splitlines()]
    x2 = next(r for r in raw if r["post_id"] == "x1cu02")
    assert x2["labels"] == 0 and by_post["x1cu02"]["chosen"][0]["content"] == x2["human_ref_B"]
    strict, skip = parse("shp", min_score_ratio=2.0)
    assert len(strict) == 4 and skip["score_ratio below min_score_ratio 2.0"] == 2


def test_hh_rlhf_multi_turn_prompt_and_bare_replies():
    recs, _ = parse("hh_rlhf")
    multi = max(recs, key=lambda r: len(r["prompt"]))
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    for r in recs:
        for m in (*r["prompt"], *r["chosen"], *r["rejected"]):
            assert not m["content"].startswith(("Human:", "Assistant:")) and "\n\nAssistant:" not in m["content"]


def test_hh_rlhf_red_team_attempts_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="red-team-attempts, which holds red-team transcripts"):
        resolve("prepare", hw="cpu", overrides=[("sources.hh_rlhf.subsets", ["red-team-attempts"])])


def test_pku_chosen_by_safer_better_or_agree():
    safer, _ = parse("pku_saferlhf")
    better, skip_b = parse("pku_saferlhf", chosen_by="better")
    agree, skip_a = parse("pku_saferlhf", chosen_by="agree")
    assert (len(safer), len(better), len(agree)) == (7, 6, 5)
    assert skip_b == {"`better_response_id` missing or not 0/1": 1}
    assert skip_a["better and safer responses disagree (chosen_by: agree)"] == 1
    flip = [(s["chosen"], b["chosen"]) for s, b in zip(safer, better, strict=False) if s["source_id"] == b["source_id"]]
    assert any(a != b for a, b in flip)
    assert all(json.loads(r["meta"])["chosen_safe"] is True for r in safer if json.loads(r["meta"])["rejected_safe"]
               is False)


def test_ultrafeedback_prompt_is_the_user_turn():
    recs, _ = parse("ultrafeedback_binarized")
    assert all([m["role"] for m in r["prompt"]] == ["user"] for r in recs)
    assert all(len(r["chosen"]) == len(r["rejected"]) == 1 for r in recs)


def test_hh_parser_on_transcripts_that_break_the_rules():
    with pytest.raises(BadRow, match="not Human/Assistant turns"):
        hh_turns("no speakers at all")
    with pytest.raises(BadRow, match="spans several Assistant turns"):
        hh_turns("\n\nHuman: hi\n\nAssistant: a  Human: b\n\nAssistant: c")
    merged = hh_turns("\n\nHuman: q\n\nAssistant: a\n\nAssistant: b\n\nHuman: q2\n\nAssistant: c")
    assert [m["role"] for m in merged] == ["user", "assistant", "user", "assistant"]
    assert merged[1]["content"] == "a\n\nb"


def test_a_missing_path_is_a_clear_error(tmp_path):
    r = resolve("prepare", hw="cpu", overrides=[("sources.oasst1.path", str(tmp_path / "nowhere"))])
    with pytest.raises(ConfigError, match=r"`sources.0.path` .*nowhere.* does not exist"):
        prepare.run(r)


def test_an_unknown_source_name_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean `oasst1`"):
        resolve("prepare", hw="cpu", overrides=[("sources.0.name", "oasst")])


def test_a_source_option_on_the_wrong_source_is_an_error():
    with pytest.raises(ConfigError, match=r"`sources.0.min_score_ratio` is read only for shp, not oasst1"):
        resolve("prepare", hw="cpu", overrides=[("sources.0.min_score_ratio", 2.0)])


def test_the_hub_offline_without_a_cache_says_how_to_fix_it():
    src = SourceConfig(name="oasst1", hub_id="OpenAssistant/oasst1", revision="fdf72ae0827c1cda404aff25b6603abec9e3399b")
    with pytest.raises(sources.SourceError, match="not in the local hub cache .* set `path:`"):
        sources.download(src)


def test_a_gated_source_says_accept_the_terms_and_log_in(monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):  # what the hub answers for a gated repo without accepted terms
        raise GatedRepoError("403 gated", response=SimpleNamespace(headers={}, status_code=403, request=None))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    src = SourceConfig(name="coig_pc_core", hub_id="BAAI/COIG-PC-core", revision="main")
    with pytest.raises(sources.SourceError, match=r"gated: accept its terms at .*BAAI/COIG-PC-core.*hf auth login"):
        sources.download(src)


def test_inline_checks_catch_a_broken_parser(monkeypatch, capsys):
    from pipeline.data import inline

    assert "7/7 parsers" in inline.run_inline_checks(list(SOURCES))
    broken = dataclasses.replace(SOURCES["shp"], parse=rowwise(lambda f, n, row, src: []))
    monkeypatch.setitem(SOURCES, "shp", broken)
    assert prepare.main(["--hw", "cpu"]) == 1
    assert "shp: expected 0 SFT + 2 pairs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The whole stage on the fixtures
# ---------------------------------------------------------------------------------------------------------------
def run_stage(tmp_path: Path, *sets: str) -> Path:
    out = tmp_path / "out"
    args = ["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={out}", *(x for s in sets for x in ("--set", s))]
    assert prepare.main(args) == 0
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """One real run of the stage on the smoke config, in its own MLflow store."""
    tmp = tmp_path_factory.mktemp("prepare")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "zh-align-test")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    out = run_stage(tmp)
    yield out, uri
    mp.undo()
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def test_the_stage_writes_exactly_the_outputs(stage):
    out, _ = stage
    assert sorted(p.name for p in out.iterdir()) == sorted([*prepare.OUTPUT_FILES, "token_lengths.png", "shares.png"])
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for name in prepare.POOLS:
        data = (out / name).read_bytes()
        assert manifest["outputs"][name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest["outputs"][name]["rows"] == data.count(b"\n")
    assert "中文" in (out / "DATA_CARD.md").read_text(encoding="utf-8")
    assert (out / "shares.png").read_bytes()[:4] == b"\x89PNG"


def test_counts_after_each_step_are_what_a_careful_reader_expects(stage):
    out, _ = stage
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["sources"]
    assert m["oasst1"]["sft"]["after"] == {"parsed": 5, "hygiene": 5, "language": 4, "dedup": 4, "decontam": 4,
                                          "length": 4}
    assert m["oasst1"]["pref"]["dropped"] == {"other language (neither zh nor en)": 1}  # the ja tree
    assert m["coig"]["sft"]["dropped"] == {"empty or too-short turn": 1}
    # coig is listed first, so the shared item stays with coig; 0:4 is 0:3 in full-width digits
    assert m["coig_pc_core"]["sft"]["dropped"] == {"duplicate (same dedup key as an earlier row)": 2}
    assert m["hh_rlhf"]["pref"]["dropped"] == {"duplicate (same dedup key as an earlier row)": 1}
    assert m["shp"]["skipped"] == {"`human_ref_B` missing or not text": 1, "non-UTF-8 bytes": 1}
    sft = rows(out / "sft.jsonl") + rows(out / "sft_eval.jsonl")
    pref = rows(out / "pref.jsonl") + rows(out / "pref_eval.jsonl")
    assert (len(sft), len(pref)) == (27, 30)  # SFT 5+18+8 parsed - 1 ja - 1 empty - 2 dups; pairs 7+5+7+6+7 - 1 - 1
    assert len({r["id"] for r in sft}) == 27 and len({r["id"] for r in pref}) == 30


def test_rows_carry_hygiene_language_tokens_bucket_and_licence(stage):
    out, _ = stage
    sft = rows(out / "sft.jsonl") + rows(out / "sft_eval.jsonl")
    text = json.dumps(sft, ensure_ascii=False)
    assert "GPT－4 在2023年 发布" in text and "ＧＰＴ" not in text and "２０２３" not in text  # letters/digits only
    assert "，" in text and "（" in text  # Chinese punctuation kept
    for r in sft:
        assert set(r) >= {"id", "source", "source_id", "lang", "n_tokens", "bucket", "licence", "messages"}
        assert r["lang"] in ("zh", "en") and r["licence"] == SOURCES[r["source"]].licence
        assert [256, 1024, 2048, 4096][r["bucket"]] >= r["n_tokens"] > ([0, 256, 1024, 2048][r["bucket"]])
    code = next(r for r in sft if "```python" in r["messages"][-1]["content"])
    assert code["lang"] == "zh"  # judged by its prose, not its code
    pku = [r for r in rows(out / "pref.jsonl") + rows(out / "pref_eval.jsonl") if r["source"] == "pku_saferlhf"]
    assert all({"chosen_safe", "rejected_safe"} <= set(r["meta"]) for r in pku)


def test_token_counts_use_the_chat_template_and_the_system_prompt(stage):
    from pipeline.core.profiles import load_model
    from pipeline.models.loading import load_tokenizer

    out, _ = stage
    model = load_model("tiny-qwen2")
    tok = load_tokenizer(model)
    row = rows(out / "sft.jsonl")[0]
    convo = [{"role": "system", "content": model.system_prompt}, *row["messages"]]
    assert row["n_tokens"] == len(tok(tok.apply_chat_template(convo, tokenize=False), add_special_tokens=False)["input_ids"])


def test_the_eval_split_keeps_trees_and_prompts_on_one_side(stage):
    out, _ = stage
    for kind, key in (("sft", "messages"), ("pref", "prompt")):
        train, held = rows(out / f"{kind}.jsonl"), rows(out / f"{kind}_eval.jsonl")
        assert held, f"{kind}_eval.jsonl is empty"

        def first_user(r, key=key):
            return next(m["content"] for m in r[key] if m["role"] == "user")
        assert not {first_user(r) for r in train} & {first_user(r) for r in held}
        trees = lambda rs: {r["source_id"][:36] for r in rs if r["source"] == "oasst1"}  # noqa: E731
        assert not trees(train) & trees(held)


def test_the_manifest_reports_the_epoch0_mix_and_its_shortfall(stage):
    out, _ = stage
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    pref = m["mix_epoch0"]["pref"]
    assert m["pool"]["pref"]["zh_share"] < 0.7 <= pref["zh_share"]  # English downsampled to hold the zh share
    assert pref["shortfall"]["action"] == "downsample"
    assert m["mix_epoch0"]["sft"]["shortfall"] is None and m["mix_epoch0"]["sft"]["zh_share"] >= 0.7


def test_everything_is_on_the_mlflow_run(stage):
    out, uri = stage
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("zh-align-test").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["licence.noncommercial"] == "true"
    assert run.data.tags["licence.noncommercial_sources"] == "coig_pc_core,hh_rlhf,shp,pku_saferlhf"
    assert run.data.metrics["rows.sft"] == len(rows(out / "sft.jsonl"))
    assert run.data.metrics["shp.skipped"] == 2
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/manifest.json", "data/DATA_CARD.md", "data/token_lengths.png", "data/shares.png"} <= arts
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert inputs == {n.removesuffix(".jsonl"): manifest["outputs"][n]["sha256"][:32] for n in prepare.POOLS}


def test_a_rerun_writes_byte_identical_files(stage, tmp_path, mlflow_store):
    out, _ = stage
    again = run_stage(tmp_path)
    for name in (*prepare.OUTPUT_FILES, "token_lengths.png", "shares.png"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_truncate_cuts_by_whole_turns(tmp_path, mlflow_store):
    out = run_stage(tmp_path, "buckets=[200, 400]", "filters.over_length=truncate", "eval_fraction=0.0",
                    "mix.sft.curriculum=[]")
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["sources"]
    sft = [r for r in rows(out / "sft.jsonl") if r.get("truncated")]
    pref = [r for r in rows(out / "pref.jsonl") if r.get("truncated")]
    assert sft and all(r["n_tokens"] <= 400 and r["messages"][-1]["role"] == "assistant" for r in sft)
    assert pref and all(r["n_tokens"] <= 400 and r["prompt"][-1]["role"] == "user" for r in pref)
    assert sum(s.get("sft", {}).get("truncated", 0) for s in m.values()) == len(sft)


def test_an_empty_pool_names_the_step_that_emptied_it(tmp_path, mlflow_store, capsys):
    args = ["--hw", "cpu", "--dry-run", "false", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", "filters.min_chars=100000"]
    assert prepare.main(args) == 1
    err = capsys.readouterr().err
    assert "the sft pool is empty: the hygiene step removed all 31 parsed rows" in err and "filters.min_chars" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_english_fallback_off_drops_english_rows_and_warns_of_emptied_sources(tmp_path, mlflow_store, caplog):
    out = run_stage(tmp_path, "filters.allow_english_fallback=false", "mix.on_shortfall=relax")
    assert {r["lang"] for r in rows(out / "sft.jsonl") + rows(out / "pref.jsonl")} == {"zh"}
    assert "source shp ends with 0 rows" in caplog.text and "English while filters.allow_english_fallback" in caplog.text


def test_the_dry_run_shows_sources_revisions_filters_and_outputs(capsys):
    assert prepare.main(["--hw", "4090"]) == 0
    page = capsys.readouterr().out
    assert "OpenAssistant/oasst1 @ fdf72ae0827c1cda404aff25b6603abec9e3399b" in page
    assert "min_cn_ratio 0.3" in page and "outputs/data/default/sft.jsonl" in page
    assert "7/7 parsers give the expected rows" in page
    assert "min_score_ratio 2.0" in page and "licence CC-BY-NC-4.0" in page


def test_parquet_shards_named_as_on_the_hub_give_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("train", "validation"):
        raw = rows(FIXTURES / f"oasst1/data/{split}-00000-of-00001.jsonl")
        (tmp_path / "data").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(raw), tmp_path / f"data/{split}-00000-of-00001-b42a775f407cee45.parquet")
    src = SourceConfig(name="oasst1", hub_id="x", revision="x", path=str(tmp_path))
    tally = Tally()
    from_parquet = list(records(src, list_files(tmp_path, src, SOURCES["oasst1"]), tally))
    from_jsonl, skipped = parse("oasst1")
    assert [r["source_id"] for r in from_parquet] == [r["source_id"] for r in from_jsonl]
    assert tally.skipped == skipped


def test_the_hub_download_asks_for_the_configured_subsets_only(monkeypatch):
    import huggingface_hub

    asked = {}

    def snapshot(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(FIXTURES / "pku_saferlhf")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    src = SourceConfig(name="pku_saferlhf", hub_id="PKU-Alignment/PKU-SafeRLHF", revision="9421ffaf", subsets=["Alpaca-7B"],
                       splits=["test"])
    root = sources.download(src)
    assert asked == {"repo_id": "PKU-Alignment/PKU-SafeRLHF", "repo_type": "dataset", "revision": "9421ffaf",
                     "allow_patterns": ["data/Alpaca-7B/*"]}
    assert [f.rel for f in list_files(root, src, SOURCES["pku_saferlhf"])] == ["data/Alpaca-7B/test.jsonl"]


def test_decontamination_drops_a_training_row_that_copies_an_eval_item(tmp_path, mlflow_store):
    import shutil

    coig = tmp_path / "coig"
    shutil.copytree(FIXTURES / "coig", coig)
    planted = {"instruction": "一年有多少个月？", "input": "A. 十个月\nB. 十二个月\nC. 十一个月\nD. 十三个月",
               "output": "B. 十二个月"}  # zh_smoke's first test item, copied into a training source
    with open(coig / "leetcode_instructions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(planted, ensure_ascii=False) + "\n")
    out = run_stage(tmp_path, f"sources.coig.path={coig}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    sft = manifest["sources"]["coig"]["sft"]
    assert sft["dropped"]["shares a long n-gram with an eval item (decontam)"] == 1
    assert sft["contaminated_by"] == {"zh_smoke": 1} and manifest["decontam"]["eval_sets"] == ["zh_smoke"]
    assert "一年有多少个月" not in (out / "sft.jsonl").read_text(encoding="utf-8") + \
        (out / "sft_eval.jsonl").read_text(encoding="utf-8")
    assert "overlapping zh_smoke: 1" in (out / "DATA_CARD.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# The token pass: the fast path gives exactly the template's counts; progress in a log is one line per step
# ---------------------------------------------------------------------------------------------------------------
def _tokenizers():
    from pipeline.core.profiles import load_model
    from pipeline.models.loading import load_tokenizer
    from pipeline.models.qwen_tokenizer import load_qwen25_tokenizer

    return {"qwen2.5": load_qwen25_tokenizer(), **{n: load_tokenizer(load_model(n)) for n in ("tiny-qwen2", "tiny-qwen3")}}


@pytest.fixture(scope="module")
def tokenizers():
    return _tokenizers()


def _fixture_rows(kind: str) -> list[dict]:
    """zh and en rows of the fixtures, multi-turn ones included, plus rows with their own system turn."""
    names = {"sft": ("oasst1", "coig", "coig_pc_core"), "pref": ("oasst1", "hh_rlhf", "shp", "pku_saferlhf",
                                                                 "ultrafeedback_binarized")}[kind]
    recs = [r for name in names for r in parse(name)[0] if r["kind"] == kind]
    key = "messages" if kind == "sft" else "prompt"
    own = [{**r, key: [{"role": "system", "content": "你是一位严谨的老师。 "}, *r[key]]} for r in recs[:3]]
    return recs + own


def _reference(tok, row: dict, kind: str, system: str | None) -> int:
    """The old way, row by row: apply_chat_template(..., tokenize=True) on each conversation."""
    from pipeline.data.clean import with_system

    def n(conv):
        return len(tok.apply_chat_template(with_system(conv, system), tokenize=True)["input_ids"])
    return n(row["messages"]) if kind == "sft" else max(n(row["prompt"] + row["chosen"]),
                                                        n(row["prompt"] + row["rejected"]))


@pytest.mark.parametrize("kind", ["sft", "pref"])
@pytest.mark.parametrize("system", ["你是一个乐于助人的助手。", None])
def test_the_fast_token_pass_counts_exactly_what_the_chat_template_gives(tokenizers, kind, system):
    from pipeline.data.clean import Lengths, count_tokens

    recs = _fixture_rows(kind)
    assert {classify(" ".join(m["content"] for m in r.get("messages") or r["prompt"])) for r in recs} >= {"zh", "en"}
    keys = ("messages",) if kind == "sft" else ("prompt", "chosen", "rejected")
    batch = {k: [r[k] for r in recs] for k in keys}
    for name, tok in tokenizers.items():
        fast = Lengths(tok, system)
        assert fast.tokenizer is None and fast.split, f"{name}: the fast path is off"
        out = count_tokens(batch, tokenizer=tok, system=system, kind=kind, edges=[64, 256, 100000], truncate=False)
        assert out["n_tokens"] == [_reference(tok, r, kind, system) for r in recs], name
        assert "messages" not in out and "prompt" not in out  # nothing rewritten unless truncating


def test_lengths_pickles_without_the_tokenizer_and_renders_other_turns_with_the_template(tokenizers):
    import pickle

    from pipeline.data import clean
    from pipeline.data.clean import Lengths

    tok = tokenizers["qwen2.5"]
    made = Lengths(tok, "系统")
    assert pickle.loads(pickle.dumps(made)) is made  # a forked map worker uses its parent's object
    blob, key = pickle.dumps(made), made.key
    del made
    assert key not in clean._MADE
    lengths = pickle.loads(blob)  # elsewhere (spawned, or the maker gone): rebuilt from its state
    convs = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"}],
             [{"role": "user", "content": "天气？"}, {"role": "tool", "content": "晴"}],  # not a plain turn
             [{"role": "user", "content": "x", "name": None}, {"role": "assistant", "content": "<|im_end|> 好"}]]
    ref = [len(tok.apply_chat_template([{"role": "system", "content": "系统"}, *c], tokenize=True)["input_ids"])
           for c in convs]
    assert lengths(convs) == ref and lengths.tokenizer is None
    assert lengths.render(convs[1]) == tok.apply_chat_template([{"role": "system", "content": "系统"}, *convs[1]],
                                                               tokenize=False)



def test_text_not_in_nfc_is_counted_with_the_normalizer_and_the_tokenizer_is_left_as_it_was(tokenizers):
    import unicodedata

    from tokenizers.normalizers import NFC

    from pipeline.data.clean import Lengths

    tok = tokenizers["qwen2.5"]
    lengths = Lengths(tok, "系统")
    assert lengths.nfc
    odd = "cafe\u0301 \uf900\uf9e2 A\u030a"  # decomposed é, compatibility ideographs, decomposed Å: NFC changes them
    assert not unicodedata.is_normalized("NFC", odd)
    convs = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": odd}],
             [{"role": "user", "content": "café 豈"}, {"role": "assistant", "content": "好的"}],
             [{"role": "user", "content": odd}, {"role": "assistant", "content": "嗯"}]]
    ref = [len(tok.apply_chat_template([{"role": "system", "content": "系统"}, *c], tokenize=True)["input_ids"])
           for c in convs]
    assert lengths(convs) == ref
    backend = tok.backend_tokenizer
    assert isinstance(backend.normalizer, NFC)  # switched back on after the call
    normalizer, backend.normalizer = backend.normalizer, None
    try:
        as_is = len(backend.encode(odd, add_special_tokens=False))
    finally:
        backend.normalizer = normalizer
    assert as_is != len(backend.encode(odd, add_special_tokens=False))  # so the count above had to use NFC

def _map_output(tmp_path, bars_off: bool) -> str:
    """A 40-batch map run with stdout and stderr going to a file, as a log would get it."""
    import subprocess
    import sys

    script = ("import logging, time, datasets, pyarrow as pa\nfrom pipeline.data import pool\n"
              "logging.basicConfig(level=logging.INFO)\ndatasets.disable_progress_bars()\n"
              f"ds = datasets.Dataset.from_dict({{'x': list(range(4000))}}).flatten_indices(cache_file_name="
              f"{str(tmp_path / f'x-{bars_off}.arrow')!r})\ndatasets.enable_progress_bars()\n"
              "def slow(b):\n    time.sleep(0.03)\n    return {'y': b['x']}\n"
              + ("pool.mapped(ds, slow, 'demo step', num_proc=2, batch_size=100, input_columns=['x'], keep=[], "
                 "types={'y': pa.int64()}, fn_kwargs={})\n" if bars_off else
                 "ds.map(slow, batched=True, batch_size=100, desc='demo step')\n"))
    log = tmp_path / f"log-{bars_off}.txt"
    # tqdm at its own pace: an earlier test's setup_logging may have set TQDM_MININTERVAL in this process
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    with open(log, "w", encoding="utf-8") as f:
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                       check=True, timeout=120)
    return log.read_text(encoding="utf-8")


def test_progress_in_a_log_file_is_one_line_per_map_step(tmp_path):
    import re

    lines = [x for x in re.split(r"[\r\n]+", _map_output(tmp_path, bars_off=True)) if x.strip()]
    assert len(lines) == 1 and re.search(r"pipeline.prepare.demo step: 4000 rows in [\d.]+ s \(\d+ rows/s; [\d.]+ CPU s\)",
                                         lines[0])
    bars = [x for x in re.split(r"[\r\n]+", _map_output(tmp_path, bars_off=False)) if x.strip()]
    assert len(bars) > 5  # what a log got before: one line per bar update


def test_compact_column_and_arrow_rows_keep_a_selections_rows_and_order(tmp_path):
    from datasets import Dataset

    from pipeline.data import pool

    recs = ({"kind": "sft", "source_id": str(i), "messages": [{"role": "user", "content": f"第{i}个问题"}]}
            for i in range(5000))
    ds = Dataset.from_file(str(pool.write_arrow(recs, tmp_path / "arrow" / "records.arrow", chunk=700)))
    assert len(ds) == 5000 and ds[4321]["messages"] == [{"role": "user", "content": "第4321个问题"}]
    for picked in ([3, 5, 700, 701, 4999], [4000, 2, 2, 1400]):  # sorted (as the stage selects), and not
        sel = ds.select(picked)
        assert pool.column(sel, "source_id") == [str(i) for i in picked]
        assert pool.arrow_rows(sel, 1, 3).column("source_id").to_pylist() == [str(i) for i in picked[1:3]]
        small = pool.compact(sel)
        assert small._indices is None and small.cache_files and small["source_id"] == [str(i) for i in picked]
        assert pool.compact(sel)["messages"] == small["messages"]  # compacted again: the same file, reused


def test_map_files_on_two_workers_writes_what_one_process_writes(tmp_path):
    """The streamed batch map: the same rows in the same order on 1 and 2 workers, the kept columns as they were, the
    returned ones typed; and batches.read streams a selection's rows (ascending) as the dataset holds them."""
    import pyarrow as pa
    from datasets import Dataset

    from pipeline.data import batches, pool

    recs = ({"kind": "sft", "source_id": str(i), "messages": [{"role": "user", "content": f"第{i}个问题"}]}
            for i in range(3000))
    ds = Dataset.from_file(str(pool.write_arrow(recs, tmp_path / "arrow" / "records.arrow", chunk=700)))
    runs = [batches.map_files(ds, _lengths_of, tmp_path / f"k{k}", num_proc=k, batch_size=256,
                              input_columns=["messages"], keep=["source_id"], types={"chars": pa.int64()},
                              fn_kwargs={"plus": 1}) for k in (1, 2)]
    assert runs[0].to_dict() == runs[1].to_dict() and runs[1].column_names == ["source_id", "chars"]
    assert runs[1]["chars"][:3] == [6, 6, 6] and runs[1]["source_id"][2999] == "2999"
    picked = [1, 5, 999, 1000, 2999]
    streamed = [t for part in batches.read(ds.select(picked), ["source_id"]) for t in part.column(0).to_pylist()]
    assert streamed == [str(i) for i in picked]
    assert batches.read(ds.select([5, 1]), ["source_id"]) is None  # not ascending: the caller takes instead


def _lengths_of(batch: dict[str, list], plus: int) -> dict[str, list]:
    return {"chars": [len(m[0]["content"]) + plus for m in batch["messages"]]}
