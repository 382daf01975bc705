"""Log-probabilities from /v1/completions: `logprobs`, `echo`, `max_tokens: 0` and lists of
prompts, as OpenAI's legacy completions API and vLLM answer them, checked against a
forward pass of the model itself over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'gptforge[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'gptforge[serve]'")
httpx = pytest.importorskip("httpx")

from conftest import save_lm_and_classifier  # noqa: E402
from gptforge import load  # noqa: E402
from gptforge.config import GPTConfig  # noqa: E402
from gptforge.serve.app import MAX_PROMPTS, background_server, create_app  # noqa: E402
from gptforge.serve.logprobs import MAX_LOGPROBS  # noqa: E402
from gptforge.tokenizer import get_tokenizer, text_to_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
PROMPTS = ["Every effort moves you", "The quick brown fox jumps", "Hi", "naïve café ☕ costs 3€"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_lm_and_classifier(tmp_path_factory.mktemp("logprob-models"), CFG)["lm"]


@pytest.fixture(scope="module")
def lm(lm_dir):
    return load(lm_dir)


@pytest.fixture(scope="module")
def url(lm_dir):
    with background_server(create_app(lm_dir)) as base:
        yield base


def complete(url: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def reference(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits over `ids`, one forward pass: row t predicts ids[t + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)


def token_str(token: int) -> str:
    return get_tokenizer().decode_single_token_bytes(token).decode("utf-8", errors="replace")


def check_against_model(model, ids: list[int], logprobs: dict, k: int, first: int = 1) -> None:
    """token_logprobs[t] and top_logprobs[t] (t >= first) are those of ids[t] given ids[:t]."""
    logp = reference(model, ids)
    assert len(logprobs["token_logprobs"]) == len(ids)
    assert logprobs["tokens"] == [token_str(t) for t in ids]
    for t in range(first, len(ids)):
        row = logp[t - 1]
        assert logprobs["token_logprobs"][t] == pytest.approx(float(row[ids[t]]), abs=1e-5)
        top = logprobs["top_logprobs"][t]
        values, best = row.topk(k)
        expected = {token_str(i): float(v) for i, v in zip(best.tolist(), values.tolist())}
        expected.setdefault(token_str(ids[t]), float(row[ids[t]]))  # the token itself is listed too
        assert top.keys() == expected.keys()
        assert list(top.values()) == pytest.approx(list(expected.values()), abs=1e-5)


def check_offsets(text: str, logprobs: dict) -> None:
    """Each token starts where the text of the tokens before it ends."""
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    if "\ufffd" not in "".join(tokens):  # whole characters only: the tokens spell the text
        assert "".join(tokens) == text
        assert offsets == [sum(len(s) for s in tokens[:i]) for i in range(len(tokens))]


# ------------------------------------------------------------------------------------
# scoring: echo with max_tokens 0

@pytest.mark.parametrize("k", [0, 1, 5])
def test_echo_with_max_tokens_0_scores_the_prompt(url, lm, k):
    prompt = PROMPTS[0]
    body = complete(url, prompt=prompt, echo=True, max_tokens=0, logprobs=k)
    (choice,) = body["choices"]
    assert choice["text"] == prompt and choice["index"] == 0 and choice["finish_reason"] == "length"
    ids = text_to_ids(prompt)
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    check_against_model(lm, ids, lp, k)
    check_offsets(prompt, lp)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_echo_without_logprobs_repeats_the_prompt(url):
    body = complete(url, prompt=PROMPTS[1], echo=True, max_tokens=0)
    assert body["choices"][0]["text"] == PROMPTS[1] and body["choices"][0]["logprobs"] is None


def test_a_list_of_prompts_is_scored_in_one_forward_pass(url, lm):
    ids = [text_to_ids(p) for p in PROMPTS]
    before = httpx.get(f"{url}/health").json()["engine"]
    body = complete(url, prompt=ids, echo=True, max_tokens=0, logprobs=2)
    after = httpx.get(f"{url}/health").json()["engine"]
    assert after["job_steps"] - before["job_steps"] == 1  # one batch, one step: no generation
    assert after["tokens"] == before["tokens"]
    assert [c["index"] for c in body["choices"]] == list(range(len(PROMPTS)))
    for choice, prompt, row in zip(body["choices"], PROMPTS, ids):
        assert choice["text"] == prompt  # token ids echo as their text
        check_against_model(lm, row, choice["logprobs"], 2)
    # The same as each prompt alone, as text.
    for choice, prompt in zip(body["choices"], PROMPTS):
        alone = complete(url, prompt=prompt, echo=True, max_tokens=0, logprobs=2)["choices"][0]
        assert alone["logprobs"]["tokens"] == choice["logprobs"]["tokens"]
        assert alone["logprobs"]["token_logprobs"][1:] == pytest.approx(
            choice["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(len(r) for r in ids)


def test_a_one_token_prompt_scores_nothing(url):
    lp = complete(url, prompt=[464], echo=True, max_tokens=0, logprobs=1)["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [None] and lp["top_logprobs"] == [None] and lp["tokens"] == ["The"]


# ------------------------------------------------------------------------------------
# logprobs of generated tokens

def test_generated_tokens_carry_their_logprobs(url, lm):
    prompt = PROMPTS[0]
    choice = complete(url, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 6
    generated = [get_tokenizer().encode_single_token(s) for s in lp["tokens"]]
    assert "".join(lp["tokens"]) == choice["text"]
    ids = text_to_ids(prompt) + generated
    n = len(ids) - len(generated)
    shifted = {k: [None] * n + v for k, v in lp.items()}  # as if the prompt were echoed
    shifted["tokens"] = [token_str(t) for t in ids[:n]] + lp["tokens"]
    check_against_model(lm, ids, shifted, 3, first=n)
    for token, top in zip(lp["token_logprobs"], lp["top_logprobs"]):  # greedy: always the top one
        assert token == pytest.approx(max(top.values()), abs=1e-6)
    assert lp["text_offset"][0] == 0
    check_offsets(choice["text"], lp)


def test_echo_with_one_new_token_as_lm_eval_asks(url, lm):
    """lm-evaluation-harness scores with echo, logprobs=1, max_tokens=1 and drops the last entry."""
    ids = [text_to_ids(p) for p in PROMPTS[:2]]
    body = complete(url, prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0, seed=1234)
    scored = complete(url, prompt=ids, echo=True, max_tokens=0, logprobs=1)
    for choice, alone, row in zip(body["choices"], scored["choices"], ids):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(row) + 1
        assert lp["tokens"][:len(row)] == alone["logprobs"]["tokens"]
        assert lp["token_logprobs"][1:len(row)] == pytest.approx(alone["logprobs"]["token_logprobs"][1:],
                                                                 abs=1e-5)
        assert choice["text"].startswith(alone["text"])
        check_against_model(lm, row, {k: v[:len(row)] for k, v in lp.items()}, 1)


def test_a_list_of_prompts_generates_one_choice_each_in_order(url):
    body = complete(url, prompt=PROMPTS, max_tokens=5, temperature=0)
    alone = [complete(url, prompt=p, max_tokens=5, temperature=0)["choices"][0]["text"] for p in PROMPTS]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == alone
    assert body["usage"]["completion_tokens"] == 5 * len(PROMPTS)


def test_stop_sequences_work_with_logprobs_and_lists(url):
    whole = complete(url, prompt=PROMPTS[:2], max_tokens=12, temperature=0)["choices"]
    stops = [c["text"][3:6] for c in whole]
    body = complete(url, prompt=PROMPTS[:2], max_tokens=12, temperature=0, stop=stops, logprobs=1)
    for choice, full in zip(body["choices"], whole):
        cut = min(i for i in (full["text"].find(s) for s in stops) if i >= 0)
        assert choice["text"] == full["text"][:cut] and choice["finish_reason"] == "stop"
        lp = choice["logprobs"]  # the tokens up to the one that completed the stop sequence
        assert "".join(lp["tokens"]).startswith(choice["text"])
        assert all(o <= len(choice["text"]) for o in lp["text_offset"])


# ------------------------------------------------------------------------------------
# streaming

def sse(url: str, **body) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("echo", [False, True])
def test_a_stream_carries_the_same_text_and_logprobs(url, echo):
    body = dict(prompt=PROMPTS[:3], max_tokens=7, temperature=0, logprobs=2, echo=echo)
    whole = complete(url, **body)["choices"]
    chunks = sse(url, **body)
    for i, choice in enumerate(whole):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
        lps = [c["logprobs"] for c in mine if c["logprobs"]]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for lp in lps for x in lp[key]] == choice["logprobs"][key]


def test_a_stream_of_scores(url):
    whole = complete(url, prompt=PROMPTS[:2], echo=True, max_tokens=0, logprobs=1)
    chunks = sse(url, prompt=PROMPTS[:2], echo=True, max_tokens=0, logprobs=1,
                 stream_options={"include_usage": True})
    assert [c["choices"][0] for c in chunks[:-1]] == whole["choices"]
    assert chunks[-1]["usage"] == whole["usage"]


# ------------------------------------------------------------------------------------
# errors and the official client

@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "logprobs": MAX_LOGPROBS + 1}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": 2.5}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": "5"}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # 0 scores only, with echo
    ({"prompt": "x", "max_tokens": -1, "echo": True}, 400, "max_tokens"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": ["fine", "word " * 80], "echo": True, "max_tokens": 0}, 400, "prompt"),
    ({"prompt": [[1, 2], [3, 99999]]}, 400, "prompt"),
    ({"prompt": ["x"] * (MAX_PROMPTS + 1)}, 413, "prompt"),
])
def test_bad_values_get_clear_errors(url, body, status, param):
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def test_chat_refuses_logprobs_clearly(url):
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "logprobs": True})
    assert r.status_code == 400 and "/v1/completions" in r.json()["error"]["message"]


def test_openai_client_scores_a_prompt(url, lm):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    prompt = PROMPTS[1]
    done = client.completions.create(model="tiny-lm", prompt=prompt, logprobs=5, echo=True, max_tokens=0)
    choice = done.choices[0]
    assert choice.text == prompt
    lp = choice.logprobs
    check_against_model(lm, text_to_ids(prompt), lp.model_dump(), 5)
    assert lp.token_logprobs[0] is None
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-lm", prompt=prompt, logprobs=MAX_LOGPROBS + 1)
    assert err.value.body["param"] == "logprobs"


# ------------------------------------------------------------------------------------
# a model of another family, with its own tokenizer

@pytest.fixture(scope="module")
def llama_dir(tokenizer_dir, tmp_path_factory):
    """A tiny random Llama 3 model with Llama 3's real tokenizer, as the Hub lays it out."""
    import shutil

    transformers = pytest.importorskip("transformers")
    tokens = tokenizer_dir("llama3")
    out = tmp_path_factory.mktemp("llama-model")
    torch.manual_seed(0)
    vocab = transformers.AutoTokenizer.from_pretrained(tokens).__len__()
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for file in tokens.iterdir():
        shutil.copy(file, out / file.name)
    return out


def test_a_llama_model_scores_as_transformers_does(llama_dir):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    text = "Hello there, how are you?"
    with background_server(create_app(str(llama_dir), model_id="llama")) as base:
        info = httpx.get(f"{base}/tokenizer_info").json()
        assert info["eos_token"] == hf_tok.eos_token and info["bos_token"] == hf_tok.bos_token
        assert info["chat_template"] and info["model_max_length"] == 256
        with_bos = httpx.post(f"{base}/tokenize", json={"prompt": text}).json()
        assert with_bos["tokens"] == hf_tok(text).input_ids and with_bos["count"] == len(with_bos["tokens"])
        bare = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert bare["tokens"] == hf_tok(text, add_special_tokens=False).input_ids
        assert httpx.post(f"{base}/detokenize", json={"tokens": bare["tokens"]}).json()["prompt"] == text
        assert httpx.post(f"{base}/detokenize", json={"tokens": [-1]}).status_code == 400

        ids = with_bos["tokens"]
        lp = complete(base, prompt=text, echo=True, max_tokens=0, logprobs=2)["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
    # The served model is gptforge's load of the directory (bfloat16 weights for these families).
    logp = reference(load(llama_dir), ids)
    assert lp["token_logprobs"][1:] == pytest.approx([float(logp[t - 1, ids[t]]) for t in range(1, len(ids))],
                                                     abs=1e-5)
    # And transformers' float32 model agrees to bfloat16's precision.
    with torch.no_grad():
        theirs = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert lp["token_logprobs"][1:] == pytest.approx([float(theirs[t - 1, ids[t]]) for t in range(1, len(ids))],
                                                     abs=1e-2)


# ------------------------------------------------------------------------------------
# the engine

def test_engine_prefills_prompts_wanting_logprobs_in_bounded_calls(lm_dir, monkeypatch):
    """Prompts that want their own logprobs are prefilled apart from the others, in calls of at
    most PROMPT_LOGPROBS_TOKENS padded positions, and still get the model's values and tokens."""
    import threading

    from gptforge.serve import engine as engine_module
    from gptforge.serve.engine import Engine, SamplingParams
    from gptforge.tokenizer import EOT_ID

    monkeypatch.setattr(engine_module, "PROMPT_LOGPROBS_TOKENS", 12)
    lm = load(lm_dir)  # the engine changes its layers' layout: a copy of its own
    shapes = []  # (rows, positions) of every forward pass with more than one position
    hook = lm.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape))
                                        if args[0].shape[1] > 1 else None)
    engine = Engine(lm, get_tokenizer(), eos_id=EOT_ID, max_active=8)
    prompts = [text_to_ids(p) for p in PROMPTS]  # 5, 6, 1 and 9+ tokens
    events: dict[int, list] = {i: [] for i in range(len(prompts) + 1)}
    done = threading.Event()

    def collect(i):
        def on_event(event):
            events[i].append(event)
            if all(e and e[-1].finish_reason for e in events.values()):
                done.set()
        return on_event

    try:
        for i, ids in enumerate(prompts):  # queued before the worker starts: admitted together
            engine.submit(ids, SamplingParams(max_tokens=2, temperature=0, logprobs=1, prompt_logprobs=True),
                          collect(i))
        engine.submit(prompts[0], SamplingParams(max_tokens=2, temperature=0), collect(len(prompts)))
        engine.start()
        assert done.wait(30)
    finally:
        engine.stop()
        hook.remove()
    lengths = [len(p) for p in prompts]
    prefills = shapes
    assert (1, lengths[0]) in prefills  # the plain request, alone
    assert all(rows * width <= 12 or rows == 1 for rows, width in prefills)
    assert sum(rows for rows, _ in prefills) == len(prompts) + 1 - sum(1 for n in lengths if n == 1)
    for i, ids in enumerate(prompts):
        first = events[i][0]
        assert first.prompt_logprobs is not None and first.prompt_logprobs[0] is None
        logp = reference(lm, ids)
        got = [e.logprob for e in first.prompt_logprobs[1:]]
        assert got == pytest.approx([float(logp[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-5)
        generated = [e for ev in events[i] for e in ev.logprobs]
        assert len(generated) == 2 and generated[0].token == int(logp[-1].argmax())
        assert generated[0].logprob == pytest.approx(float(logp[-1].max()), abs=1e-5)
    assert all(not ev.logprobs and ev.prompt_logprobs is None for ev in events[len(prompts)])
