"""lm-evaluation-harness against SILO's OpenAI-compatible API, on a task built from the corpus.

The task (`silo.lmeval_task`) is checked as data: items from held-out documents only, the
true next sentence among distractors from other documents, deterministic, refused when
there are too few documents. Then the real harness (`python -m lm_eval`, a subprocess,
offline) runs it against a real HTTP server on loopback in the LM-only, kNN-LM and ∞-gram
modes, and the log-likelihood it logs for each choice is the sum of the library's own
scores of the continuation's tokens (`score_documents`, `knn_score`, `score_infgram`), the
tokens split the way the harness splits them. In kNN-LM mode a token may differ where its
k-th neighbour is tied, to float32 precision, with the next one (`_near_ties`): the server
(one query at a time) and `silo eval` (batches) may then keep different neighbours.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
import yaml
from silo.datastore.kinds import open_store
from silo.server.app import load_state, make_admission
from silo.server.auth import Auth, OwnerCredentials
from silo.server.http import start_http
from silo.server.limits import Limits

from silo.app.cli import main
from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents, split_of
from silo.errors import SiloError
from silo.evaluate import score_documents
from silo.infgram import InfgramParams, score_infgram
from silo.knnlm import KNNParams, knn_score, retrieve_neighbours
from silo.lm import load_causal_lm
from silo.lmeval_task import (
    MIN_CHOICE_WORDS,
    MIN_CONTEXT_WORDS,
    TASK,
    build_cloze_items,
    read_results,
    task_commands,
    write_cloze_task,
)
from silo.tokenizer import text_ids

TIERS = ("restricted", "by")  # the generated corpus holds only two restricted test documents
ADMIN = "lmeval-admin-token-0123456789abcdef"
WINDOW = 128
LIMIT = 2  # items per mode: 8 log-likelihoods each


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


# ---------------------------------------------------------------------------- the task


def test_cloze_items_come_from_held_out_documents(corpus_dir, tmp_path):
    info = write_cloze_task(corpus_dir, tmp_path / "task", tiers=TIERS, n=50, choices=4, seed=0)
    items = [json.loads(line) for line in (tmp_path / "task" / f"{TASK}.jsonl").read_text().splitlines()]
    docs = {d["doc_id"]: d for d in iter_documents(corpus_dir)}
    held_out = [d for d in docs.values() if split_of(d["doc_id"]) == "test" and d["tier"] in TIERS]
    assert info["items"] == len(items) == len(held_out) >= 2  # one item per usable document
    for it in items:
        doc = docs[it["doc_id"]]
        assert split_of(doc["doc_id"]) == "test" and doc["tier"] in TIERS
        assert len(it["choices"]) == 4 and len({" ".join(c.lower().split()) for c in it["choices"]}) == 4
        answer = it["choices"][it["label"]]
        # the context is the document's beginning, and the answer the sentence right after it
        assert doc["text"].startswith(it["context"]) and _words(it["context"]) >= MIN_CONTEXT_WORDS
        assert doc["text"][len(it["context"]):].lstrip().startswith(answer)
        # the harness puts " " between context and choice: neither side brings its own
        assert it["context"] == it["context"].rstrip() and all(c == c.strip() for c in it["choices"])
        for i, choice in enumerate(it["choices"]):
            assert _words(choice) >= MIN_CHOICE_WORDS
            if i != it["label"]:  # a distractor: a sentence of another held-out document
                assert any(choice in d["text"] for d in held_out if d["doc_id"] != it["doc_id"])
    config = yaml.safe_load((tmp_path / "task" / f"{TASK}.yaml").read_text())
    assert config["task"] == TASK and config["output_type"] == "multiple_choice"
    assert config["dataset_path"] == "json" and config["test_split"] == "test"
    assert config["dataset_kwargs"]["data_files"]["test"] == info["data"] == str(tmp_path / "task" / f"{TASK}.jsonl")
    assert (config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"]) == ("context", "choices", "label")
    assert config["target_delimiter"] == " "
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]


def test_cloze_task_is_deterministic_for_a_seed(corpus_dir, tmp_path):
    a = build_cloze_items(corpus_dir, tiers=None, seed=3)
    assert a == build_cloze_items(corpus_dir, tiers=None, seed=3)
    assert a != build_cloze_items(corpus_dir, tiers=None, seed=4)  # the choices' order and the distractors move
    assert len(build_cloze_items(corpus_dir, tiers=None, n=2)) == 2
    write_cloze_task(corpus_dir, tmp_path, tiers=TIERS)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_cloze_task(corpus_dir, tmp_path, tiers=TIERS)
    assert write_cloze_task(corpus_dir, tmp_path, tiers=TIERS, seed=1, overwrite=True)["seed"] == 1


def test_too_few_held_out_documents_are_refused(corpus_dir, tmp_path):
    with pytest.raises(SiloError, match="too few"):  # no test document of the pd tier in the generated corpus
        write_cloze_task(corpus_dir, tmp_path / "task", tiers=("pd",))
    assert not (tmp_path / "task").exists()
    with pytest.raises(SiloError, match="too few"):  # two documents: not enough distinct distractors for 12 choices
        build_cloze_items(corpus_dir, tiers=("restricted",), choices=12)


def test_cli_writes_the_task_and_prints_the_lm_eval_commands(corpus_dir, tmp_path, capsys):
    main(["lm-eval-task", "--corpus", str(corpus_dir), "--out", str(tmp_path / "t"), "--tiers", "restricted,by",
          "-n", "3", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 3 and info["include_path"] == str(tmp_path / "t")
    knn = info["commands"]["knn"]
    assert knn.startswith("HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model local-completions")
    assert "base_url=http://127.0.0.1:8000/v1/completions,model=MODEL:knn,tokenizer_backend=remote" in knn
    assert f"--include_path {tmp_path / 't'} --tasks {TASK}" in knn
    main(["lm-eval-task", "--corpus", str(corpus_dir), "--out", str(tmp_path / "t"), "--tiers", "restricted,by",
          "--overwrite"])
    out = capsys.readouterr().out
    assert "model=MODEL:none" in out and "model=MODEL:infgram" in out
    with pytest.raises(SystemExit) as e:  # a user error: one line, exit 2
        main(["lm-eval-task", "--corpus", str(corpus_dir), "--out", str(tmp_path / "u"), "--tiers", "pd"])
    assert e.value.code == 2 and "too few" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the harness, live


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("lmeval-stores")
    for kind in ("token", "infgram"):
        build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(root / kind),
                              tiers=("restricted",), kind=kind, window=WINDOW, stride=WINDOW // 2, progress=False))
    return {"token": root / "token", "infgram": root / "infgram"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, stores):
    """A real HTTP server (uvicorn, in a thread) on the tiny model and both stores."""
    tmp = tmp_path_factory.mktemp("lmeval-server")
    state = load_state(str(tiny_model), [str(stores["token"]), str(stores["infgram"])], limits=Limits(),
                       auth=Auth(ADMIN, OwnerCredentials(tmp / "owners.json")))
    http = start_http(state, make_admission(limits=state.limits), "127.0.0.1", 0)
    yield http
    http.stop()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("lmeval-task")
    write_cloze_task(corpus_dir, out, tiers=TIERS)
    return out


@pytest.fixture(scope="module")
def library(tiny_model, stores):
    """The model and the stores opened here, apart from the server: the library's own scores."""
    model, tok = load_causal_lm(str(tiny_model))
    opened = {kind: open_store(path) for kind, path in stores.items()}
    yield model, tok, opened
    for s in opened.values():
        s.close()


def _harness_split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `TemplateLM._encode_pair` makes them for a
    causal model: trailing spaces of the context move to the continuation, the whole text
    is encoded, and the continuation is what follows the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = text_ids(tok, context)
    return context_ids, text_ids(tok, context + continuation)[len(context_ids):]


def _knn_params(store) -> KNNParams:
    """The kNN-LM parameters a request that names none gets: the store's defaults over the
    built-in ones, k and nprobe lowered to the server's limits (the defaults' here)."""
    params = KNNParams.merged(store.manifest.defaults)
    return replace(params, k=min(params.k, Limits().max_k),
                   nprobe=None if params.nprobe is None else min(params.nprobe, Limits().max_nprobe))


def _library_logprobs(library, mode: str, ids: list[int]) -> np.ndarray:
    """Log-probs of tokens 1..n-1 of `ids` under `mode`, as `silo eval` computes them (one
    window: the whole sequence, as the server's echo sees it)."""
    model, tok, opened = library
    window = model.config.max_position_embeddings
    assert len(ids) <= window
    if mode == "none":
        return score_documents(model, [ids], window=window, stride=window // 2, pad_id=tok.pad_token_id)[0]
    if mode == "knn":
        store = opened["token"]
        return knn_score(model, store, ids, _knn_params(store), window=window, stride=window // 2,
                         pad_id=tok.pad_token_id)[1]
    store = opened["infgram"]
    scored = score_infgram(model, store, [ids], window=window, stride=window // 2, pad_id=tok.pad_token_id)[0]
    return scored.logprob(InfgramParams.merged(store.manifest.defaults))


def _near_ties(library, ids: list[int]) -> np.ndarray:
    """Per scored token: is its k-th neighbour tied, to float32 precision, with the (k+1)-th?

    Squared L2 distances in float32 are computed as |q|² + |y|² - 2q·y, in a different order
    for one query (the server's echo, a token at a time on the KV cache) than for a batch
    (`silo eval`, whole windows): each is off by up to about 1e-6 |q|². Where the k-th and the
    (k+1)-th neighbours are closer than that, either may be in the k, and the two
    computations can disagree on that token; the generated corpus, made of a few sentence
    templates, has many such near-duplicate keys."""
    model, tok, opened = library
    store, window = opened["token"], model.config.max_position_embeddings
    params = _knn_params(store)
    nb = retrieve_neighbours(model, store, [ids], params.k + 1, window=window, stride=window // 2,
                             pad_id=tok.pad_token_id, nprobe=params.nprobe, keep_queries=True)[0]
    gap = nb.dists[:, params.k] - nb.dists[:, params.k - 1]
    return gap <= 2e-6 * (nb.queries.astype(np.float64) ** 2).sum(axis=1)


def _echo(server, model: str, ids: list[int]) -> np.ndarray:
    """The server's log-probs of the prompt tokens `ids`, asked as the harness asks."""
    body = {"model": model, "prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return np.asarray(json.loads(r.read())["choices"][0]["logprobs"]["token_logprobs"][:-1])


MODES = ("none", "knn", "infgram")


@pytest.fixture(scope="module")
def harness_runs(server, task_dir, tiny_model, tmp_path_factory) -> dict:
    """The harness run once per mode, the three at the same time against the one server (each
    a fresh interpreter: starting them together overlaps their imports): mode -> (its
    command, its folder, the finished process)."""
    pytest.importorskip("lm_eval")
    # the commands `silo lm-eval-task --model` prints, as printed (the harness as `python -m lm_eval`)
    commands = task_commands(task_dir, tiny_model, server.url, program=f"{shlex.quote(sys.executable)} -m lm_eval")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path_factory.getbasetemp() / "hf-datasets")}
    runs = {}
    for mode in MODES:
        cwd = tmp_path_factory.mktemp(f"harness-{mode}")
        runs[mode] = (commands[mode], cwd, subprocess.Popen(f"{commands[mode]} --limit {LIMIT} --log_samples",
                                                            shell=True, cwd=cwd, stdout=subprocess.PIPE,
                                                            stderr=subprocess.PIPE, text=True, env=env))
    finished = {}
    for mode, (command, cwd, proc) in runs.items():
        out, err = proc.communicate(timeout=900)
        finished[mode] = (command, cwd, subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_lm_eval_harness_scores_like_silo_eval(mode, harness_runs, server, library, tiny_model):
    model_id = f"{tiny_model.resolve().name}:{mode}"
    command, cwd, run = harness_runs[mode]
    assert f"model={model_id}," in command and f"max_length={library[0].config.max_position_embeddings - 1}" \
        in command
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    metrics, samples = read_results(cwd / f"lmeval-{mode}")
    assert 0.0 <= metrics["acc,none"] <= 1.0 and 0.0 <= metrics["acc_norm,none"] <= 1.0
    assert len(samples) == LIMIT
    # the harness's accuracy is the share of items whose true sentence scored highest
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    assert metrics["acc,none"] == pytest.approx(np.mean([np.argmax(ll) == s["doc"]["label"]
                                                         for ll, s in zip(lls, samples, strict=True)]))

    # each log-likelihood is the library's: [BOS] + context + continuation, summed over the continuation
    _, tok, _ = library
    agreed = 0
    for s, ll in zip(samples, lls, strict=True):
        for i, harness_ll in enumerate(ll):
            arg = s["arguments"][f"gen_args_{i}"]
            assert arg["arg_1"] == " " + s["doc"]["choices"][i]  # the continuation starts with one space
            context_ids, continuation_ids = _harness_split(tok, arg["arg_0"], arg["arg_1"])
            ids = [tok.bos_token_id, *context_ids, *continuation_ids]
            ours = _library_logprobs(library, mode, ids)
            assert len(ours) == len(ids) - 1
            cont = slice(len(context_ids), None)
            # the harness's split of context and continuation is ours: its number is the server's
            # log-probs of exactly these continuation tokens
            served = _echo(server, model_id, ids[1:])
            assert harness_ll == pytest.approx(float(served[cont].sum()), abs=1e-4), (i, arg)
            differ = np.abs(served - ours) > 1e-4
            if mode == "knn":  # only where the k-th neighbour is a float32 tie (`_near_ties`)
                assert not (differ & ~_near_ties(library, ids)).any(), np.flatnonzero(differ)
            else:
                assert not differ.any(), np.flatnonzero(differ)
            if not differ[cont].any():
                assert harness_ll == pytest.approx(float(ours[cont].sum()), abs=1e-3), (i, arg)
                agreed += 1
    # every choice in LM-only and ∞-gram mode; kNN-LM: all but those a tied neighbour moved
    assert agreed == LIMIT * 4 if mode != "knn" else agreed >= LIMIT
