"""Every encoder task through client -> preproc_service -> model_service equals the in-process
transformers pipeline on the same tiny model (question-answering: the transformers 4.x algorithm,
checked against a brute-force search over the model's own start/end logits)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch

from client.preproc_client import PreprocClient
from splitserve_pb import preproc_pb2 as pb
from tests import preproc_helpers as h
from tests import servers

TOL = 1e-4


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("preproc_models")


def _served(models_root, task, seed=0, **mlmodel):
    directory, model, tokenizer = h.build_task_model(models_root, task, seed, **mlmodel)
    with h.stack(directory) as (model_proc, preproc_proc):
        with PreprocClient(preproc_proc.address, timeout=60) as client:
            yield {"client": client, "model": model, "tokenizer": tokenizer, "pipe": h.pipeline(task, model, tokenizer),
                   "model_proc": model_proc, "preproc_proc": preproc_proc}


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


# ---------------------------------------------------------------- text-classification

@pytest.fixture(scope="class")
def tc(models_root):
    # MLflow defaults: the saved model_config says top_k 2 and no function; the signature's
    # param default (sigmoid) outranks the model_config; per-request values outrank both.
    yield from _served(models_root, "text-classification", seed=1,
                       model_config={"top_k": 2, "function_to_apply": "none"},
                       signature_params=[{"name": "function_to_apply", "type": "string", "default": "sigmoid",
                                          "shape": None}])


class TestTextClassification:
    def test_mlflow_defaults_apply(self, tc):
        got = tc["client"].classify(h.SENTENCES)
        want = tc["pipe"](h.SENTENCES, top_k=2, function_to_apply="sigmoid")
        for g, w in zip(got, want, strict=True):
            assert [x.label for x in g] == [x["label"] for x in w]
            assert np.allclose([x.score for x in g], [x["score"] for x in w], atol=TOL)
        assert got.applied_parameters == {"function_to_apply": "sigmoid", "top_k": 2, "truncation": True}
        assert tc["client"].info().default_parameters == got.applied_parameters

    def test_best_label_equals_pipeline(self, tc):
        got = tc["client"].classify(h.SENTENCES, top_k=1, function_to_apply="softmax")
        want = tc["pipe"](h.SENTENCES)
        assert [r[0].label for r in got] == [w["label"] for w in want]
        assert np.allclose([r[0].score for r in got], [w["score"] for w in want], atol=TOL)
        assert got.applied_parameters["function_to_apply"] == "softmax"

    @pytest.mark.parametrize("function", ["softmax", "sigmoid", "none"])
    def test_top_k_and_function(self, tc, function):
        got = tc["client"].classify(h.SENTENCES, top_k=3, function_to_apply=function)
        want = tc["pipe"](h.SENTENCES, top_k=3, function_to_apply=function)
        for g, w in zip(got, want, strict=True):
            assert [x.label for x in g] == [x["label"] for x in w]
            assert np.allclose([x.score for x in g], [x["score"] for x in w], atol=TOL)
        assert got.applied_parameters == {"function_to_apply": function, "top_k": 3, "truncation": True}

    def test_all_labels_equals_the_pipelines_explicit_top_k_none(self, tc):
        """top_k unset: the best label; all_labels: every label, sorted, as pipeline(top_k=None). The saved
        model_config's top_k 2 gives way to the request's all_labels."""
        want = tc["pipe"](h.SENTENCES, top_k=None, function_to_apply="sigmoid")
        assert all(len(w) == 3 for w in want)
        got = tc["client"].classify(h.SENTENCES, all_labels=True)
        for g, w in zip(got, want, strict=True):
            assert [x.label for x in g] == [x["label"] for x in w]
            assert np.allclose([x.score for x in g], [x["score"] for x in w], atol=TOL)
        assert got.applied_parameters == {"function_to_apply": "sigmoid", "top_k": None, "all_labels": True,
                                          "truncation": True}
        request = pb.PredictRequest(id="every", classify=pb.ClassifyRequest(texts=h.SENTENCES[:1], all_labels=True))
        (reply,) = tc["client"].predict_stream([request])
        assert [x.label for x in reply.classify.results[0].labels] == [x["label"] for x in want[0]]
        assert len(tc["client"].classify(h.SENTENCES, all_labels=False)[0]) == 2  # false asks for nothing

    def test_text_pairs(self, tc):
        texts, pairs = ["who lives in paris", "the river"], ["Alice lives in Paris.", "is long"]
        got = tc["client"].classify(texts, pairs, top_k=2, function_to_apply="softmax")
        want = tc["pipe"]([{"text": t, "text_pair": p} for t, p in zip(texts, pairs, strict=True)], top_k=2)
        for g, w in zip(got, want, strict=True):
            assert [x.label for x in g] == [x["label"] for x in w]
            assert np.allclose([x.score for x in g], [x["score"] for x in w], atol=TOL)

    def test_long_input_truncated_by_default_and_refused_without_truncation(self, tc):
        long_text = " ".join(["river forest music"] * 60)
        got = tc["client"].classify([long_text], top_k=1, function_to_apply="softmax")
        want = tc["pipe"]([long_text], truncation=True)
        assert got[0][0].label == want[0]["label"] and abs(got[0][0].score - want[0]["score"]) < TOL
        with pytest.raises(grpc.RpcError) as exc:
            tc["client"].classify([long_text], truncation=False)
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
        assert "tokens long" in exc.value.details() and "limit of 64" in exc.value.details()

    @pytest.mark.parametrize("call, fragment", [
        (lambda c: c.classify([]), "empty"),
        (lambda c: c.classify(["a"], top_k=0), "top_k"),
        (lambda c: c.classify(["a"], top_k=-2), "top_k"),
        (lambda c: c.classify(["a"], top_k=2, all_labels=True), "top_k=2 and all_labels both given"),
        (lambda c: c.classify(["a"], function_to_apply="tanh"), "function_to_apply"),
        (lambda c: c.classify(["a", "b"], ["only one pair"]), "text_pairs"),
    ])
    def test_bad_input_is_invalid_argument(self, tc, call, fragment):
        with pytest.raises(grpc.RpcError) as exc:
            call(tc["client"])
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in exc.value.details()

    def test_wrong_task_for_the_model(self, tc):
        with pytest.raises(grpc.RpcError) as exc:
            tc["client"].fill_mask(["the [MASK] river"])
        assert _code(exc) == grpc.StatusCode.FAILED_PRECONDITION
        assert "fill-mask" in exc.value.details() and "text-classification" in exc.value.details()
        # ... and the service keeps serving.
        assert len(tc["client"].classify(["still here"])) == 1

    def test_predict_stream_keeps_input_order_and_answers_bad_items(self, tc):
        items = []
        for i in range(40):
            request = pb.ClassifyRequest(texts=[h.SENTENCES[i % len(h.SENTENCES)]], top_k=2)
            if i % 7 == 3:
                request = pb.ClassifyRequest(texts=[])  # a bad item among good ones
            items.append(pb.PredictRequest(id=f"item-{i}", classify=request))
        items.append(pb.PredictRequest(id="wrong-task", fill_mask=pb.FillMaskRequest(texts=["[MASK]"])))
        replies = list(tc["client"].predict_stream(items))
        assert [r.id for r in replies] == [item.id for item in items]
        for item, reply in zip(items, replies, strict=True):
            if item.id == "wrong-task":
                assert reply.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            elif not item.classify.texts:
                assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            else:
                want = tc["pipe"](list(item.classify.texts), top_k=2)[0]
                assert [x.label for x in reply.classify.results[0].labels] == [x["label"] for x in want]

    def test_deadline_and_cancelled_stream_leave_the_service_serving(self, tc):
        with pytest.raises(grpc.RpcError) as exc:
            tc["client"].stub.Classify(pb.ClassifyRequest(texts=h.SENTENCES * 20), timeout=0.001)
        assert _code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED
        items = (pb.PredictRequest(id=str(i), classify=pb.ClassifyRequest(texts=[h.SENTENCES[i % 5]]))
                 for i in range(10_000))
        stream = tc["client"].predict_stream(items)
        assert next(stream).id == "0"
        stream.cancel()  # the caller leaves mid-stream: the service stops that work
        assert len(tc["client"].classify(h.SENTENCES)) == len(h.SENTENCES)

    def test_tokenize_detokenize_info(self, tc):
        tok = tc["tokenizer"]
        got = tc["client"].tokenize(h.SENTENCES)
        for text, g in zip(h.SENTENCES, got, strict=True):
            want = tok(text, return_offsets_mapping=True)
            assert g.ids == want["input_ids"]
            assert g.offsets == [tuple(o) for o in want["offset_mapping"]]
            assert g.tokens == tok.convert_ids_to_tokens(want["input_ids"])
        texts = tc["client"].detokenize([g.ids for g in got])
        assert texts == tok.batch_decode([g.ids for g in got], skip_special_tokens=True)
        with pytest.raises(grpc.RpcError) as exc:
            tc["client"].detokenize([[10**6]])
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
        info = tc["client"].info()
        assert info.task == "text-classification"
        assert info.labels == ["negative", "neutral", "positive"]
        assert info.max_length == 64 and info.vocab_size == len(tok)
        assert info.model_service == tc["model_proc"].address


    def test_cli_predict_tokenize_info(self, tc):
        address = tc["preproc_proc"].address

        def cli(*args, stdin=None):
            done = subprocess.run([sys.executable, "-m", "client", "--address", address, *args], input=stdin,
                                  capture_output=True, text=True, timeout=60, cwd=servers.ROOT)
            assert done.returncode == 0, done.stderr
            return [json.loads(line) for line in done.stdout.splitlines()]  # one JSON line per input

        got = cli("predict", "--top-k", "3", "--function-to-apply", "softmax", h.SENTENCES[0], h.SENTENCES[1])
        want = tc["pipe"](h.SENTENCES[:2], top_k=3)
        assert [[x["label"] for x in row] for row in got] == [[x["label"] for x in row] for row in want]
        every = cli("predict", "--all-labels", "--function-to-apply", "sigmoid", h.SENTENCES[2])
        want = tc["pipe"](h.SENTENCES[2:3], top_k=None, function_to_apply="sigmoid")
        assert [[x["label"] for x in row] for row in every] == [[x["label"] for x in row] for row in want]
        tokens = cli("tokenize", stdin="hello world\nthe river\n")
        assert [t["ids"] for t in tokens] == [tc["tokenizer"](t)["input_ids"] for t in ["hello world", "the river"]]
        assert cli("info")[0]["task"] == "text-classification"
        whole = cli("--format", "json", "tokenize", "a", "b")  # one line holding the list
        assert len(whole) == 1 and [t["ids"] for t in whole[0]] == [tc["tokenizer"](t)["input_ids"] for t in "ab"]
        failed = subprocess.run([sys.executable, "-m", "client", "--address", address, "predict", "--top-k", "0",
                                 "x"], capture_output=True, text=True, timeout=60, cwd=servers.ROOT)
        assert failed.returncode == 1 and json.loads(failed.stderr)["error"]["code"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------- token-classification

@pytest.fixture(scope="class")
def ner(models_root):
    yield from _served(models_root, "token-classification", seed=2)


class TestTokenClassification:
    @pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
    def test_entities_equal_pipeline(self, ner, strategy):
        got = ner["client"].classify_tokens(h.SENTENCES, aggregation_strategy=strategy, ignore_labels=[])
        want = ner["pipe"](h.SENTENCES, aggregation_strategy=strategy, ignore_labels=[])
        key = "entity" if strategy == "none" else "entity_group"
        for g, w in zip(got, want, strict=True):
            assert len(g) == len(w) > 0
            for ge, we in zip(g, w, strict=True):
                assert (getattr(ge, key), ge.word, ge.start, ge.end) == (we[key], we["word"], we["start"], we["end"])
                assert abs(ge.score - float(we["score"])) < TOL
                if strategy == "none":
                    assert ge.index == we["index"]

    def test_default_ignores_O(self, ner):
        got = ner["client"].classify_tokens(h.SENTENCES, aggregation_strategy="simple")
        want = ner["pipe"](h.SENTENCES, aggregation_strategy="simple")
        assert [[(e.entity_group, e.start, e.end) for e in g] for g in got] == \
               [[(e["entity_group"], e["start"], e["end"]) for e in w] for w in want]
        assert got.applied_parameters["ignore_labels"] == ["O"]

    def test_unknown_aggregation_strategy(self, ner):
        with pytest.raises(grpc.RpcError) as exc:
            ner["client"].classify_tokens(["Alice"], aggregation_strategy="median")
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT and "aggregation_strategy" in exc.value.details()
        assert len(ner["client"].classify_tokens(["Alice"])) == 1


# ---------------------------------------------------------------- fill-mask

@pytest.fixture(scope="class")
def fm(models_root):
    yield from _served(models_root, "fill-mask", seed=3)


class TestFillMask:
    TEXTS = ["Alice walked to the [MASK] in Paris.", "the [MASK] market", "[MASK] is a [MASK] city"]

    def _compare(self, got_masks, want):
        want_masks = want if isinstance(want[0], list) else [want]
        assert len(got_masks) == len(want_masks)
        for g, w in zip(got_masks, want_masks, strict=True):
            assert [(c.token, c.token_str, c.sequence) for c in g] == \
                   [(x["token"], x["token_str"], x["sequence"]) for x in w]
            assert np.allclose([c.score for c in g], [x["score"] for x in w], atol=TOL)

    @pytest.mark.parametrize("top_k", [None, 1, 3])
    def test_equals_pipeline(self, fm, top_k):
        options = {} if top_k is None else {"top_k": top_k}
        got = fm["client"].fill_mask(self.TEXTS, **options)
        for text, masks in zip(self.TEXTS, got, strict=True):
            self._compare(masks, fm["pipe"](text, **options))
        assert got.applied_parameters["top_k"] == (top_k or 5)

    def test_targets(self, fm):
        targets = ["river", "market", "paris", "zzzzunknown"]
        got = fm["client"].fill_mask(self.TEXTS[:2], targets=targets, top_k=3)
        for text, masks in zip(self.TEXTS[:2], got, strict=True):
            self._compare(masks, fm["pipe"](text, targets=targets, top_k=3))

    def test_no_mask_token(self, fm):
        with pytest.raises(grpc.RpcError) as exc:
            fm["client"].fill_mask(["no mask here"])
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT and "[MASK]" in exc.value.details()


# ---------------------------------------------------------------- zero-shot-classification

@pytest.fixture(scope="class")
def zs(models_root):
    yield from _served(models_root, "zero-shot-classification", seed=4)


class TestZeroShot:
    LABELS = ["travel", "music", "science", "history"]

    @pytest.mark.parametrize("multi_label", [False, True])
    def test_equals_pipeline(self, zs, multi_label):
        got = zs["client"].zero_shot_classify(h.SENTENCES[:3], self.LABELS, multi_label=multi_label)
        for text, g in zip(h.SENTENCES[:3], got, strict=True):
            w = zs["pipe"](text, candidate_labels=self.LABELS, multi_label=multi_label)
            assert g.sequence == w["sequence"] and g.labels == w["labels"]
            assert np.allclose(g.scores, w["scores"], atol=TOL)

    def test_template_and_single_label(self, zs):
        template = "The topic is {}."
        got = zs["client"].zero_shot_classify([h.SENTENCES[0]], ["music"], hypothesis_template=template)
        w = zs["pipe"](h.SENTENCES[0], candidate_labels=["music"], hypothesis_template=template)
        assert got[0].labels == w["labels"] and np.allclose(got[0].scores, w["scores"], atol=TOL)

    def test_missing_labels(self, zs):
        with pytest.raises(grpc.RpcError) as exc:
            zs["client"].zero_shot_classify(["text"], [])
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT and "candidate_labels" in exc.value.details()


# ---------------------------------------------------------------- feature-extraction (tiny model)

@pytest.fixture(scope="class")
def fe(models_root):
    yield from _served(models_root, "feature-extraction", seed=5)


class TestFeatureExtraction:
    def test_token_vectors_equal_pipeline(self, fe):
        got = fe["client"].embed(h.SENTENCES)
        for text, g in zip(h.SENTENCES, got, strict=True):
            want = np.array(fe["pipe"](text))[0]
            assert g.shape == want.shape and g.dtype == np.float32
            assert np.allclose(g, want, atol=TOL)
        assert got.applied_parameters["pooling"] == "none"

    def test_pooled_and_float16(self, fe):
        tok, model = fe["tokenizer"], fe["model"]
        got = fe["client"].embed(h.SENTENCES, pooling="mean", normalize=True, float16=True)
        enc = tok(h.SENTENCES, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        want = torch.nn.functional.normalize(mean, dim=-1).numpy()
        assert all(g.dtype == np.float16 and g.shape == (32,) for g in got)
        assert np.allclose(np.stack(got).astype(np.float32), want, atol=2e-3)
        assert got.prompt_tokens == int(enc["attention_mask"].sum())

    def test_cli_one_compact_line_per_embedding_and_quiet_when_the_reader_leaves(self, fe):
        cli = [sys.executable, "-m", "client", "--address", fe["preproc_proc"].address, "embed", "--pooling", "mean"]
        done = subprocess.run([*cli, *h.SENTENCES[:2]], capture_output=True, text=True, timeout=60,
                              cwd=servers.ROOT)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 2 and " " not in lines[0]
        assert np.allclose(json.loads(lines[1]), fe["client"].embed(h.SENTENCES[1:2], pooling="mean")[0], atol=1e-6)
        # Far more output than a pipe holds, read by `head -n 1`: no BrokenPipe traceback.
        texts = "\n".join(h.SENTENCES * 80) + "\n"
        piped = subprocess.run(f"{shlex.join(cli)} | head -n 1", shell=True, input=texts, capture_output=True,
                               text=True, timeout=120, cwd=servers.ROOT)
        assert len(piped.stdout.splitlines()) == 1 and piped.stderr == ""


# ---------------------------------------------------------------- question-answering

@pytest.fixture(scope="class")
def qa(models_root):
    directory, model, tokenizer = h.build_task_model(models_root, "question-answering", seed=6)
    with h.stack(directory) as (model_proc, preproc_proc):
        with PreprocClient(preproc_proc.address, timeout=60) as client:
            yield {"client": client, "model": model, "tokenizer": tokenizer}


class TestQuestionAnswering:
    SHORT = [("who lives in paris?", "Alice lives in Paris with Bob and Carol."),
             ("what is long?", "the river is long and the forest is old")]
    LONG_CONTEXT = " ".join(
        ["the gentle worker builds a modern system in Tokyo every summer morning, and Alice reads history"] * 12)

    def _check(self, got, want):
        assert [(a.answer, a.start, a.end) for a in got] == [(a["answer"], a["start"], a["end"]) for a in want]
        assert np.allclose([a.score for a in got], [a["score"] for a in want], atol=TOL)

    @pytest.mark.parametrize("top_k", [1, 3])
    def test_short_contexts(self, qa, top_k):
        got = qa["client"].answer_question(self.SHORT, top_k=top_k)
        for (q, c), answers in zip(self.SHORT, got, strict=True):
            self._check(answers, h.qa_reference(qa["model"], qa["tokenizer"], q, c, top_k=top_k))
            for a in answers:
                assert a.answer == c[a.start:a.end]

    def test_long_context_uses_doc_stride_windows(self, qa):
        question = "who reads history?"
        n_windows = len(qa["tokenizer"](question, self.LONG_CONTEXT, truncation="only_second", max_length=64,
                                        stride=20, return_overflowing_tokens=True)["input_ids"])
        assert n_windows > 3
        got = qa["client"].answer_question([(question, self.LONG_CONTEXT)], top_k=2, doc_stride=20,
                                           max_answer_len=5)
        want = h.qa_reference(qa["model"], qa["tokenizer"], question, self.LONG_CONTEXT, top_k=2, stride=20,
                            max_answer_len=5)
        self._check(got[0], want)
        assert got.applied_parameters["doc_stride"] == 20 and got.applied_parameters["max_seq_len"] == 64

    def test_handle_impossible_answer(self, qa):
        q, c = self.SHORT[0]
        got = qa["client"].answer_question([(q, c)], top_k=3, handle_impossible_answer=True)
        self._check(got[0], h.qa_reference(qa["model"], qa["tokenizer"], q, c, top_k=3, impossible=True))

    @pytest.mark.parametrize("inputs, options, fragment", [
        ([("who?", "")], {}, "context"),
        ([("", "Alice lives in Paris")], {}, "question"),
        ([], {}, "empty"),
        ([("who?", "Alice")], {"top_k": 0}, "top_k"),
        ([("who?", "Alice")], {"max_answer_len": 0}, "max_answer_len"),
        ([("who?", "Alice")], {"doc_stride": 100, "max_seq_len": 50}, "doc_stride"),
    ])
    def test_bad_input(self, qa, inputs, options, fragment):
        with pytest.raises(grpc.RpcError) as exc:
            qa["client"].answer_question(inputs, **options)
        assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT and fragment in exc.value.details()
