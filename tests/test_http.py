"""The OpenAI-compatible HTTP API: real gRPC and HTTP servers on loopback, one state.

The `openai` client and curl talk to the HTTP API; `SiloClient` to gRPC on the same
process. The same requests both ways give the same tokens, log-probs and citations, and
the echoed prompt's log-probs are the ones `Score` (and so `silo eval`) gives the text.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from silo.server.app import build_server, load_state, make_admission
from silo.server.auth import Auth, OwnerCredentials
from silo.server.client import SiloClient, retrieval_options
from silo.server.gen import silo_pb2 as pb
from silo.server.http import MAX_CHOICES, start_http
from silo.server.limits import Limits
from silo.server.servicers import DatastoreServicer, LanguageModelServicer

from silo.build import BuildArgs, build_store
from silo.corpus import iter_documents

ADMIN = "http-admin-token-0123456789abcdef"
WINDOW = 128
PROMPT = "The lighthouse of Lisbon was built in"


def _build(tiny_model, corpus_dir, out, **kw):
    build_store(BuildArgs(model=str(tiny_model), corpus=str(corpus_dir), out=str(out), tiers=("restricted",),
                          window=WINDOW, stride=WINDOW // 2, progress=False, **kw))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("http-stores")
    return [_build(tiny_model, corpus_dir, root / "token"), _build(tiny_model, corpus_dir, root / "infgram",
                                                                   kind="infgram")]


class Served:
    """gRPC and HTTP on one server state, with one set of budgets."""

    def __init__(self, tiny_model, stores, tmp, limits: Limits | None = None, max_concurrent: int = 32):
        self.creds = OwnerCredentials(tmp / "owners.json")
        self.owner_token, _ = self.creds.issue("owner-4")
        auth = Auth(ADMIN, self.creds)
        self.state = load_state(str(tiny_model), [str(s) for s in stores], limits=limits, auth=auth)
        self.admission = make_admission(None, max_concurrent, limits)
        self.grpc, port, _ = build_server({"LanguageModel": LanguageModelServicer(self.state),
                                           "Datastore": DatastoreServicer(self.state)}, 0, auth=auth,
                                          limits=limits, admission=self.admission)
        self.target = f"127.0.0.1:{port}"
        self.http = start_http(self.state, self.admission, "127.0.0.1", 0)
        self.model = tiny_model.resolve().name
        self.openai = openai.OpenAI(base_url=self.http.url + "/v1", api_key="none", max_retries=0)

    def client(self, token: str | None = None) -> SiloClient:
        return SiloClient(self.target, token=token)

    def curl(self, path: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
        cmd = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", self.http.url + path]
        if body is not None:
            cmd += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        if token:
            cmd += ["-H", f"Authorization: Bearer {token}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
        text, code = out.rsplit("\n", 1)
        return int(code), json.loads(text) if text.strip() else {}

    def stop(self):
        self.http.stop()
        self.grpc.stop(0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model, stores):
    s = Served(tiny_model, stores, tmp_path_factory.mktemp("http"))
    yield s
    s.stop()


def _generate(served, mode: str, **kw) -> list[pb.GenerateResponse]:
    with served.client() as c:
        return list(c.generate(PROMPT, retrieval=retrieval_options(mode=mode), **kw))


def test_models_and_a_completion_with_the_openai_client(served):
    ids = [m.id for m in served.openai.models.list().data]
    assert ids == [served.model, f"{served.model}:none", f"{served.model}:knn", f"{served.model}:infgram"]
    r = served.openai.completions.create(model=f"{served.model}:knn", prompt=PROMPT, max_tokens=6, temperature=0,
                                         logprobs=3)
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop") and r.usage.completion_tokens == len(choice.logprobs.tokens)
    assert all(len(top) <= 3 and lp <= 0 for top, lp in zip(choice.logprobs.top_logprobs,
                                                           choice.logprobs.token_logprobs, strict=True))
    silo = choice.model_extra["silo"]
    assert silo["mode"] == "knn" and silo["citations"], silo  # SILO's part: the sources of the completion
    assert silo["citations"][0]["doc_id"].startswith("doc-")


@pytest.mark.parametrize("mode", ["none", "knn", "infgram"])
def test_http_and_grpc_give_the_same_tokens_logprobs_and_citations(served, mode):
    r = served.openai.completions.create(model=served.model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                         extra_body={"silo": {"mode": mode}})
    stream = _generate(served, mode, max_new_tokens=8, top_logprobs=2)
    tokens = [x.token for x in stream if x.HasField("token")]
    summary = stream[-1].summary
    choice = r.choices[0]
    assert choice.text == summary.text
    assert choice.logprobs.tokens == [t.text for t in tokens]
    assert choice.logprobs.token_logprobs == pytest.approx([t.logprob for t in tokens], abs=1e-6)
    assert [list(d) for d in choice.logprobs.top_logprobs] == [[x.text for x in t.top] for t in tokens]
    cited = choice.model_extra["silo"]["citations"]
    assert [c["doc_id"] for c in cited] == [c.doc_id for c in summary.citations]
    assert choice.model_extra["silo"]["mode"] == mode


@pytest.mark.parametrize("mode", ["none", "knn", "infgram"])
def test_echoed_logprobs_are_the_scores_of_the_text(served, mode):
    """lm-evaluation-harness reads log-likelihood from echo + logprobs: it must be what
    Score (and `silo eval`) gives the same tokens in the same mode."""
    r = served.openai.completions.create(model=f"{served.model}:{mode}", prompt=PROMPT, max_tokens=0, echo=True,
                                         logprobs=1, temperature=0)
    echoed = r.choices[0].logprobs.token_logprobs
    with served.client() as c:
        scored = c.score(PROMPT, retrieval=retrieval_options(mode=mode))
    assert r.choices[0].text == PROMPT and r.usage.completion_tokens == 0
    # Score also scores the closing </s>; the echo is the prompt's tokens only
    assert echoed == pytest.approx([t.logprob for t in scored.tokens[:-1]], abs=1e-4)
    # the same log-likelihood when the prompt comes as token ids (the harness's way)
    with served.client() as c:
        ids = list(c.tokenize(PROMPT).ids)
    r2 = served.openai.completions.create(model=f"{served.model}:{mode}", prompt=ids, max_tokens=1, echo=True,
                                          logprobs=1, temperature=0)
    assert r2.choices[0].logprobs.token_logprobs[:-1] == pytest.approx(echoed, abs=1e-5)


def test_streaming_n_seeds_and_stop_sequences(served):
    kw = dict(model=f"{served.model}:none", prompt=PROMPT, max_tokens=10, temperature=0)
    whole = served.openai.completions.create(**kw).choices[0].text
    chunks = list(served.openai.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length" and "silo" in chunks[-1].choices[0].model_extra
    sampled = served.openai.completions.create(model=served.model, prompt=[PROMPT, "In 1717, Alan"], n=2,
                                               max_tokens=6, temperature=1.0, seed=7)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    again = served.openai.completions.create(model=served.model, prompt=[PROMPT, "In 1717, Alan"], n=2,
                                             max_tokens=6, temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # a seed makes it repeatable
    stop = whole.strip()[:2]
    cut = served.openai.completions.create(stop=[stop], **kw).choices[0]
    assert stop not in cut.text and cut.finish_reason == "stop" and whole.startswith(cut.text)


def test_curl_and_the_silo_routes(served):
    code, body = served.curl("/v1/completions", {"model": served.model, "prompt": PROMPT, "max_tokens": 4,
                                                 "temperature": 0})
    assert code == 200 and body["object"] == "text_completion" and body["choices"][0]["text"]
    code, hits = served.curl("/v1/silo/search", {"query": PROMPT, "k": 3})
    assert code == 200 and len(hits["hits"]) == 3 and hits["hits"][0]["doc_id"].startswith("doc-")
    code, traced = served.curl("/v1/silo/trace", {"text": "The lighthouse of Lisbon was built in 1700 by Ada Lovelace."})
    assert code == 200 and traced["spans"] and traced["spans"][0]["documents"]
    code, info = served.curl("/v1/silo/info")
    assert code == 200 and info["trained_on_restricted"] is False and "restricted" not in info["trained_tiers"]
    code, doc = served.curl("/openapi.json")
    assert code == 200 and {"/v1/completions", "/v1/models", "/v1/silo/optout", "/v1/silo/trace"} <= set(doc["paths"])
    code, tok = served.curl("/tokenize", {"prompt": PROMPT})
    assert code == 200 and tok["tokens"] == list(served.client().tokenize(PROMPT).ids)
    code, back = served.curl("/detokenize", {"tokens": tok["tokens"]})
    assert code == 200 and back["prompt"] == PROMPT


def _error(served, status: int, **body) -> dict:
    code, reply = served.curl("/v1/completions", {"model": served.model, "prompt": PROMPT, **body})
    assert code == status, reply
    assert set(reply["error"]) >= {"message", "type", "code"}, reply
    return reply["error"]


def test_bad_requests_are_refused_in_openais_shape(served):
    assert _error(served, 400, max_tokens=10**6)["code"] == "invalid_argument"
    assert "temperature" in _error(served, 400, temperature=float("nan"))["message"]
    assert _error(served, 400, prompt="")["code"] == "invalid_argument"
    assert _error(served, 400, prompt=[])["code"] == "invalid_argument"
    assert "token id" in _error(served, 400, prompt=[1, 2, 10**9])["message"]
    assert _error(served, 400, silo={"k": 0})["code"] == "invalid_argument"
    assert _error(served, 400, silo={"bogus": 1})["code"] == "invalid_argument"  # unknown fields are refused
    assert "retriever" in _error(served, 400, silo={"retriever": "splade"})["message"]
    assert "reuse" in _error(served, 400, silo={"mode": "knn", "reuse": -1})["message"]
    assert "reuse" in _error(served, 400, silo={"mode": "knn", "k": 4, "reuse": 5})["message"]
    assert "skip_above" in _error(served, 400, silo={"mode": "knn", "skip_above": 0})["message"]
    code, err = served.curl("/v1/silo/search", {"query": "x y", "store": "token", "retriever": "splade"})
    assert code == 400 and "retriever must be one of bm25, dense, hybrid" in err["error"]["message"]
    assert _error(served, 400, frobnicate=True)["code"] == "invalid_argument"
    assert "logit_bias" in _error(served, 400, logit_bias={"5": 100})["message"]
    assert _error(served, 400, echo=True, silo={"mode": "ric"})["code"] == "invalid_argument"  # no passage store
    assert _error(served, 404, model="gpt-4")["type"] == "not_found_error"
    # work caps are 413: the request's own size, which no retry fixes
    assert _error(served, 413, prompt=[PROMPT] * 5, n=MAX_CHOICES)["code"] == "resource_exhausted"
    big = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: application/json",
                          "--data-binary", "@-", served.http.url + "/v1/silo/search"],
                         input='{"query": "' + "x" * (17 << 20) + '"}', capture_output=True, text=True, timeout=120)
    assert big.stdout == "413"
    with pytest.raises(openai.BadRequestError):
        served.openai.completions.create(model=served.model, prompt=PROMPT, max_tokens=-1)


def test_opt_out_over_http_with_owner_tokens(served):
    creds = served.state.auth.owners
    other, _ = creds.issue("owner-1")
    store = served.state.stores["token"]
    mine = next(d for i, d in enumerate(store.docs.doc_ids.to_pylist())
                if store.doc_owner(i) == "owner-4" and not store.dead_docs[i])
    assert served.curl("/v1/silo/optout", {"doc_ids": {"ids": [mine]}})[0] == 401
    code, err = served.curl("/v1/silo/optout", {"doc_ids": {"ids": [mine]}}, token=other)
    assert code == 403 and err["error"]["type"] == "permission_error"
    assert served.curl("/v1/silo/whoami", token=served.owner_token)[1] == {"kind": "owner", "owner": "owner-4"}
    code, dry = served.curl("/v1/silo/optout", {"doc_ids": {"ids": [mine]}, "dry_run": True}, token=served.owner_token)
    assert code == 200 and dry["dry_run"] and dry["removed_doc_ids"] == [mine] and not dry["receipt_id"]
    code, done = served.curl("/v1/silo/optout", {"doc_ids": {"ids": [mine]}}, token=served.owner_token)
    assert code == 200 and done["receipt_id"] and done["removed_doc_ids"] == [mine]
    code, status = served.curl("/v1/silo/optout/status", {"receipt_id": done["receipt_id"]}, token=served.owner_token)
    assert code == 200 and status["removed"] and status["tombstoned"] and mine in status["removed_doc_ids"]
    # both halves at once: the served model's training record says it never saw the document
    weights = status["weights"]
    assert weights["has_record"] and not weights["trained_doc_ids"] and not weights["trained_text_doc_ids"]
    assert weights["statement"].startswith(f"not in the training record of the served model {served.model}")
    with served.client(served.owner_token) as c:  # the same over gRPC
        assert c.optout_status(receipt_id=done["receipt_id"]).weights.statement == weights["statement"]
    # the promise over HTTP: the removed document is no longer a source
    code, hits = served.curl("/v1/silo/search", {"query": store.doc_text(store.doc_index(mine))[:200], "k": 50})
    assert code == 200 and mine not in {h["doc_id"] for h in hits["hits"]}
    assert served.curl("/v1/silo/optout", {"doc_ids": {"ids": ["no-such-doc"]}}, token=ADMIN)[0] == 404


def test_http_and_grpc_share_one_budget(tmp_path, tiny_model, stores):
    """A stream held open over gRPC takes the only stream slot: HTTP gets 429 with
    Retry-After at once, and its slot back when the stream ends."""
    s = Served(tiny_model, stores, tmp_path, limits=Limits(max_streams=1))
    try:
        with s.client() as c:
            held = c.generate(PROMPT, max_new_tokens=400, retrieval=retrieval_options(mode="none"))
            next(held)  # the stream is open and holds its slot
            with pytest.raises(openai.RateLimitError) as e:
                s.openai.completions.create(model=s.model, prompt=PROMPT, max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            held.cancel()
        deadline = time.monotonic() + 10
        while True:
            try:
                s.openai.completions.create(model=s.model, prompt=PROMPT, max_tokens=2)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slot was never given back"
                time.sleep(0.1)
    finally:
        s.stop()


@pytest.mark.slow
def test_silo_serve_http_port(tmp_path, tiny_model, stores):
    """`silo serve --http-port 0` serves both APIs from one process."""
    (tmp_path / "admin.token").write_text(ADMIN)
    ready, http_ready, log = tmp_path / "ready", tmp_path / "http-ready", tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-m", "silo.app.cli", "serve", "--model", str(tiny_model),
                             "--store", str(stores[0]), "--port", "0", "--ready-file", str(ready), "--http-port", "0",
                             "--http-ready-file", str(http_ready), "--token-file", str(tmp_path / "admin.token")],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (ready.is_file() and ready.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        port = int(http_ready.read_text())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model=tiny_model.resolve().name, prompt=PROMPT, max_tokens=3, temperature=0)
        assert r.choices[0].model_extra["silo"]["mode"] == "knn"  # SILO by default, as over gRPC
        with SiloClient(f"127.0.0.1:{int(ready.read_text())}") as c:
            assert c.model_info().default_mode == pb.RETRIEVAL_KNN
    finally:
        proc.terminate()
        proc.wait(30)


def test_grpc_echo_and_token_id_prompts(served):
    """The Generate fields the HTTP API relies on, over gRPC: echo, top_logprobs, prompt ids."""
    with served.client() as c:
        ids = list(c.tokenize(PROMPT).ids)
        out = list(c.generate("", prompt_token_ids=ids, max_new_tokens=2, echo=True, top_logprobs=4,
                              retrieval=retrieval_options(mode="knn")))
        echoed = [x.token for x in out if x.HasField("token") and x.token.prompt]
        assert [t.token_id for t in echoed] == ids and all(len(t.top) == 4 for t in echoed)
        assert all(math.isfinite(t.logprob) and t.logprob <= 0 for t in echoed)
        assert out[-1].summary.generated_tokens == 2 and out[-1].summary.prompt_tokens == len(ids)
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate(PROMPT, prompt_token_ids=ids))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate(PROMPT, max_new_tokens=0))  # 0 new tokens only with echo
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_audit_over_grpc_and_http_is_public_bounded_and_from_the_record(served, corpus_dir):
    """Anyone can ask whether a text or a document was in the served model's training data."""
    trained = next(iter_documents(corpus_dir, tiers=("sw",), split="train"))
    restricted = next(iter_documents(corpus_dir, tiers=("restricted",), split="train", columns=[]))
    with served.client() as c:  # no token: public
        r = c.audit(trained["text"], [trained["doc_id"], restricted["doc_id"]], membership=True)
    assert r.has_record and r.verdict == "trained" and trained["doc_id"] in r.same_documents
    assert list(r.trained_doc_ids) == [trained["doc_id"]] and r.shingle_fpr == pytest.approx(1e-4)
    assert r.statement.startswith(f"{served.model}: the text is in the training data; trained on {trained['doc_id']}")
    assert r.scored and r.min_k < 0 and r.min_k_pp != 0
    # calibrated against held-out documents the record proves were never trained on
    assert r.reference_proven and r.reference_documents > 0 and 0 <= r.min_k_pp_percentile <= 100
    code, body = served.curl("/v1/silo/audit", {"text": "zzq " * 40})
    assert code == 200 and body["verdict"] == "not" and body["found"] == 0 and not body["scored"]
    code, err = served.curl("/v1/silo/audit", {})
    assert code == 400 and "give a text or doc_ids" in err["error"]["message"]
    big = json.dumps({"text": "x" * (served.state.limits.max_text_chars + 1)}).encode()
    req = urllib.request.Request(served.http.url + "/v1/silo/audit", data=big, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:  # over the text limit: refused before any work
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "text" in json.loads(e.value.read())["error"]["message"]
