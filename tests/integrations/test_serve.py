"""The OpenAI-compatible server (prefix_attn.serve) through a real HTTP client (httpx) against a
uvicorn server started here on 127.0.0.1 (a free port) and stopped at the end.

Oracle: each request's greedy tokens through the server equal `model.generate` of a separate
model that holds only that request's adapter (or none), loaded by the integration's own loaders
(load_prefix, load_peft_prefix, load_peft_prompt): the server's bank, its paged attention and
transformers' continuous batching are all outside the oracle. The adapters are random and large
enough that every adapter (and the base model) gives a different continuation of the same
prompt, so a prefix leaking into another request's rows shows as a wrong token.

Every wait is bounded (client timeouts, joins with timeouts): a hang fails the test.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import hf_testing as H  # noqa: E402
import transformers  # noqa: E402
import uvicorn  # noqa: E402

from prefix_attn.integrations import transformers as hf  # noqa: E402
from prefix_attn.serve.app import Limits, build_app  # noqa: E402
from prefix_attn.serve.engine import Engine  # noqa: E402

P = 4
NEW = 6
TIMEOUT = 60.0  # client-side bound on any one call


def _config():
    config = H.tiny_config("llama")
    config.eos_token_id = None  # every request runs to max_tokens: lengths are what the test asks
    return config


def _base():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config()).eval()


def _copy(base):
    model = transformers.LlamaForCausalLM(copy.deepcopy(base.config)).eval()
    model.load_state_dict(base.state_dict())
    model.config._attn_implementation = "sdpa"
    return model


def _char_tokenizer():
    """A character-level tokenizer over the tiny vocabulary (ids = ASCII codes), with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(i): i for i in range(H.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="?", pad_token=chr(0))
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


def _adapters(base, root):
    """name -> (path, reference model holding that adapter alone): two prefixes saved by
    save_prefix, a PEFT prefix-tuning adapter and a PEFT prompt-tuning adapter."""
    from peft import PromptTuningConfig, get_peft_model

    from prefix_attn.integrations.prompt_tuning import load_peft_prompt

    out = {}
    for i, name in enumerate(["ours-a", "ours-b"]):
        model = H.random_prefix(hf.add_prefix_tuning(_copy(base), P), seed=10 + i, std=3.0)
        path = os.path.join(root, name)
        hf.save_prefix(model, path)
        out[name] = (path, model)
    path = os.path.join(root, "peft-prefix")
    H.peft_twin(_copy(base), P, path, seed=20, std=3.0)
    out["peft-prefix"] = (path, hf.load_peft_prefix(_copy(base), path))
    path = os.path.join(root, "peft-prompt")
    peft_model = get_peft_model(_copy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    g = torch.Generator().manual_seed(30)
    with torch.no_grad():
        for p in peft_model.prompt_encoder["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3.0)
    peft_model.save_pretrained(path)
    out["peft-prompt"] = (path, load_peft_prompt(_copy(base), path))
    return out


def _reference(model, ids, max_new_tokens=NEW):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


class _Running:
    """A uvicorn server in a thread on a free port; stop() shuts it down as SIGTERM would."""

    def __init__(self, app, engine):
        self.engine, self.port = engine, H._free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, timeout=30):
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not shut down"
        assert not self.engine.manager.is_running(), "the generation thread outlived the server"


def _serve(base, *, limits=None, max_queue=64, tokenizer=None, grace=10.0):
    engine = Engine(_copy(base), num_virtual_tokens=P, max_adapters=6, max_queue=max_queue, num_blocks=128,
                    max_batch_tokens=256)
    app = build_app(engine, tokenizer, base_name="tiny", limits=limits or Limits(max_new_tokens=32, max_context=128),
                    shutdown_grace=grace)
    return _Running(app, engine)


class _Gate:
    """Holds the generation loop before its next step while closed (a forward pre-hook on the
    served model), so requests stay in flight as long as a test needs."""

    def __init__(self, engine):
        self.open = threading.Event()
        self.open.set()
        self.handle = engine.model.register_forward_pre_hook(self._hold)

    def _hold(self, *args):
        self.open.wait(30)  # returns None: the hook changes nothing

    def close(self):
        self.open.clear()

    def release(self):
        self.open.set()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = _base()
    adapters = _adapters(base, str(tmp_path_factory.mktemp("adapters")))
    running = _serve(base, tokenizer=_char_tokenizer())
    for name, (path, _) in adapters.items():
        r = httpx.post(running.url + "/admin/adapters", json={"name": name, "path": path}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
    yield base, adapters, running
    running.stop()


def _prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, H.VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


async def _complete(client, model, prompt, stream=False, max_tokens=NEW):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if model is not None:
        body["model"] = model
    if not stream:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]
    tokens, finish = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                tokens += choice["token_ids"]
                finish = choice["finish_reason"] or finish
    assert finish == "length"
    return tokens


def test_mixed_concurrent_requests_equal_generate_alone(served):
    """16 concurrent requests over four adapters of three formats and the base model, a quarter of
    them streamed: each one's greedy tokens equal generate() with its adapter alone, the adapters
    all continue the same prompt differently (no leak would go unseen), and steps mixed adapters."""
    base, adapters, running = served
    names = list(adapters) + [None]
    prompts = _prompts(16)
    jobs = [(names[i % len(names)], prompts[i], i % 4 == 3) for i in range(16)]

    async def main():
        async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(_complete(client, n, p, s) for n, p, s in jobs))

    results = asyncio.run(main())
    plain = _copy(base)
    for (name, prompt, _), got in zip(jobs, results):
        ref = _reference(adapters[name][1] if name else plain, prompt)
        assert got == ref, f"{name}: {got} != generate alone {ref}"
    probe = prompts[0]
    continuations = {name: _reference(adapters[name][1] if name else plain, probe) for name in names}
    assert len({tuple(v) for v in continuations.values()}) == len(names), continuations
    assert running.engine.stats["max_distinct_slots"] >= 3  # requests of different adapters shared steps
    assert running.engine._pending == 0 and not running.engine._slot_of_request


def test_chat_and_text_prompts_stream_as_they_complete(served):
    base, adapters, running = served
    messages = [{"role": "user", "content": "hi there"}]
    with httpx.Client(base_url=running.url, timeout=TIMEOUT) as client:
        r = client.post("/v1/chat/completions", json={"model": "ours-b", "messages": messages, "max_tokens": NEW})
        assert r.status_code == 200, r.text
        full = r.json()
        assert full["object"] == "chat.completion" and full["model"] == "ours-b"
        assert full["usage"]["completion_tokens"] == NEW
        ids = _char_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert full["choices"][0]["token_ids"] == _reference(adapters["ours-b"][1], list(ids))
        text, role = "", None
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": "ours-b", "messages": messages, "max_tokens": NEW, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            delta = json.loads(line[6:])["choices"][0]["delta"]
            role = delta.get("role", role)
            text += delta.get("content", "")
        assert role == "assistant" and text == full["choices"][0]["message"]["content"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == _reference(_copy(base), [97, 98, 99], 3)
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert models[0] == "tiny" and set(models[1:]) == set(adapters)


def test_limits_and_bad_requests_are_400s(served):
    _, _, running = served
    with httpx.Client(base_url=running.url, timeout=TIMEOUT) as client:
        def post(body, path="/v1/completions"):
            return client.post(path, json=body)
        cases = [
            ({"prompt": [1, 2], "max_tokens": 33}, 400, "at most 32"),
            ({"prompt": list(range(1, 100)), "max_tokens": 30}, 400, "context is 128"),
            ({"prompt": [1, 2], "max_tokens": 0}, 400, "positive integer"),
            ({"prompt": [], "max_tokens": 2}, 400, "empty"),
            ({"prompt": [1, 999], "max_tokens": 2}, 400, "token ids"),
            ({"prompt": [1, 2], "n": 2}, 400, "'n' must be 1"),
            ({"prompt": [1, 2], "temperature": 0.7}, 400, "greedy"),
            ({"prompt": [1, 2], "model": "nope"}, 404, "does not exist"),
        ]
        for body, status, words in cases:
            r = post(body)
            assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
        r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert post({"messages": "hi"}, "/v1/chat/completions").status_code == 400
    assert running.engine._pending == 0


def test_adapters_load_and_unload_at_run_time_bad_ones_refused(served, tmp_path):
    base, adapters, running = served
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    wrong_p = tmp_path / "wrong-p"
    hf.save_prefix(H.random_prefix(hf.add_prefix_tuning(_copy(base), P + 1)), str(wrong_p))
    with httpx.Client(base_url=running.url, timeout=TIMEOUT) as client:
        for name, path, words in [("bad", bad, "LORA"), ("wrong-p", wrong_p, "P = 4"),
                                  ("missing", tmp_path / "none", "not a directory"),
                                  ("ours-a", adapters["ours-a"][0], "loaded already")]:
            r = client.post("/admin/adapters", json={"name": name, "path": str(path)})
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        prompt = [5, 6, 7]
        r = client.post("/v1/completions", json={"model": "ours-a", "prompt": prompt, "max_tokens": NEW})
        assert r.json()["choices"][0]["token_ids"] == _reference(adapters["ours-a"][1], prompt)  # still serving
        r = client.post("/admin/adapters", json={"name": "again", "path": adapters["peft-prefix"][0]})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": "again", "prompt": prompt, "max_tokens": NEW})
        assert r.json()["choices"][0]["token_ids"] == _reference(adapters["peft-prefix"][1], prompt)
        assert client.delete("/admin/adapters/again").status_code == 200
        assert client.post("/v1/completions", json={"model": "again", "prompt": prompt}).status_code == 404
        assert client.delete("/admin/adapters/again").status_code == 404


def test_queue_full_429_timeout_504_and_cancellation():
    """With the generation loop held: the admitted requests fill --max-queue and the next one gets
    429; a request past --request-timeout gets 504 and leaves the engine; a client that goes away
    (waiting for a whole answer, or mid-stream) cancels its request: it frees its place, and the
    streamed one stops short of max_tokens."""
    base = _base()
    running = _serve(base, max_queue=3, limits=Limits(max_new_tokens=32, max_context=128, request_timeout=2.0))
    gate = _Gate(running.engine)
    try:
        async def main():
            async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as client:
                gate.close()
                held = [asyncio.ensure_future(client.post("/v1/completions", json={"prompt": [1, 2, 3],
                                                                                   "max_tokens": 4}))
                        for _ in range(3)]
                deadline = time.monotonic() + 10
                while running.engine._pending < 3:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                r = await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
                assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
                answers = await asyncio.gather(*held)  # the gate stays closed: each one times out
                assert [a.status_code for a in answers] == [504] * 3, [a.text for a in answers]
                assert "request-timeout" in answers[0].json()["error"]["message"]
                assert running.engine._pending == 0
                with pytest.raises(httpx.ReadTimeout):  # a client that gives up: its place is freed
                    await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4}, timeout=0.5)
                deadline = time.monotonic() + 10
                while running.engine._pending:  # the gate is still closed: it cannot have finished
                    assert time.monotonic() < deadline, "the abandoned request still holds its place"
                    await asyncio.sleep(0.02)
                gate.release()

                steps = running.engine.stats["steps"]
                async with client.stream("POST", "/v1/completions",
                                         json={"prompt": [1, 2, 3], "max_tokens": 32, "stream": True}) as s:
                    async for line in s.aiter_lines():
                        if line.startswith("data: "):
                            gate.close()  # one token in: hold the loop, then hang up
                            break
                deadline = time.monotonic() + 10
                while running.engine._pending:
                    assert time.monotonic() < deadline, "the cancelled request still holds its place"
                    await asyncio.sleep(0.02)
                gate.release()
                scheduler = running.engine.manager.batch_processor.scheduler
                deadline = time.monotonic() + 20
                while scheduler.active_requests or scheduler.waiting_requests:  # gone, cancelled or done
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                assert running.engine.stats["steps"] - steps < 32  # cancelled: it did not run to max_tokens
                r = await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
                assert r.status_code == 200
        asyncio.run(main())
    finally:
        gate.release()
        running.stop()


def test_shutdown_finishes_running_requests_then_refuses():
    """A request in flight when the server is asked to stop still completes (within the grace);
    the generation thread is stopped after it."""
    base = _base()
    running = _serve(base, grace=10.0)
    gate = _Gate(running.engine)
    result = {}

    def client():
        result["r"] = httpx.post(running.url + "/v1/completions", json={"prompt": [3, 4], "max_tokens": 5},
                                 timeout=TIMEOUT)

    gate.close()
    worker = threading.Thread(target=client)
    worker.start()
    deadline = time.monotonic() + 10
    while running.engine._pending < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    time.sleep(0.3)
    gate.release()
    worker.join(TIMEOUT)
    stopper.join(TIMEOUT)
    assert not worker.is_alive() and not stopper.is_alive()
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["choices"][0]["token_ids"] == _reference(_copy(base), [3, 4], 5)
    with pytest.raises(httpx.TransportError):
        httpx.post(running.url + "/v1/completions", json={"prompt": [3, 4]}, timeout=5)


def test_smollm2_mixed_adapters_equal_generate_alone(smollm2, tmp_path):
    """The real model, through its chat template: two random prefixes (one ours, one PEFT) and the
    base model, concurrently; each answer equals generate() with that adapter alone."""
    model, tokenizer = smollm2
    base = copy.deepcopy(model).eval()
    base.config._attn_implementation = "sdpa"
    paths, refs = {}, {}
    for i, name in enumerate(["ours", "peft"]):
        ref = H.random_prefix(hf.add_prefix_tuning(copy.deepcopy(base), P), seed=40 + i, std=1.0)
        path = str(tmp_path / name)
        if name == "ours":
            hf.save_prefix(ref, path)
        else:
            hf.save_peft_prefix(ref, path)
        paths[name], refs[name] = path, ref
    refs[None] = base
    engine = Engine(copy.deepcopy(base), num_virtual_tokens=P, max_adapters=2, num_blocks=64, max_batch_tokens=512)
    running = _Running(build_app(engine, tokenizer, base_name="smollm2", limits=Limits(max_new_tokens=16)), engine)
    try:
        for name, path in paths.items():
            assert engine.load_adapter(name, path) >= 0
        questions = ["What is the capital of France?", "Say hello."]
        jobs = [(name, q) for q in questions for name in ("ours", "peft", None)]

        async def ask(client, name, question):
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 6}
            if name:
                body["model"] = name
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        async def main():
            async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as client:
                return await asyncio.gather(*(ask(client, n, q) for n, q in jobs))

        results = asyncio.run(main())
        for (name, question), got in zip(jobs, results):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            assert got == _reference(refs[name], ids, 6), (name, question)
        assert engine.stats["max_distinct_slots"] == 3
    finally:
        running.stop()


def test_the_one_command_serves_and_stops_on_sigterm(tmp_path):
    """`python -m prefix_attn.serve BASE --adapters NAME=DIR BAD` as a user runs it: the bad adapter
    is refused at start-up and the others served; SIGTERM stops it after its shutdown ran."""
    import signal
    import subprocess
    import sys

    base = _base()
    checkpoint = tmp_path / "tiny"
    base.save_pretrained(checkpoint)
    _char_tokenizer().save_pretrained(checkpoint)
    model = H.random_prefix(hf.add_prefix_tuning(_copy(base), P), seed=50, std=3.0)
    hf.save_prefix(model, str(tmp_path / "good"))
    (tmp_path / "bad").mkdir()
    port = H._free_port()
    env = {**os.environ, "PYTHONPATH": H.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "prefix_attn.serve", str(checkpoint), "--adapters", f"good={tmp_path / 'good'}",
           str(tmp_path / "bad"), "--port", str(port), "--num-blocks", "32", "--max-batch-tokens", "128",
           "--max-new-tokens", "8"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"model": "good", "prompt": "hello", "max_tokens": 4},
                       timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == _reference(model, [ord(c) for c in "hello"], 4)
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=TIMEOUT).json()["data"]] == [
            str(checkpoint), "good"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        # uvicorn shuts down, then re-raises the signal it caught: -SIGTERM is its clean exit
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "adapter 'bad' refused" in out and out.rstrip().endswith("prefix_attn.serve: stopped"), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


@pytest.mark.parametrize("lengths", [
    [(3, 3), (1, 7), (4, 9), (1, 1)],   # a prefill, decodes, a chunked prefill over a cached past
    [(1, 5), (1, 12), (1, 2)],          # a decode step (grouped query heads)
    [(6, 6)],
])
def test_paged_attention_regroups_each_request_against_float64(lengths):
    """The paged attention function alone, on a packed step of requests with (queries, keys)
    lengths as given and slots mixing bank entries and no prefix: each request's output equals
    a float64 attention over [its prefix ; its keys], causal bottom-right."""
    from prefix_attn.integrations.transformers import PREFIX_KWARG
    from prefix_attn.serve.engine import _plan, paged_prefix_attention

    g = torch.Generator().manual_seed(len(lengths))
    Hq, Hkv, D, T, P_ = 6, 2, 8, 3, 5
    slots = [(i % (T + 1)) - 1 for i in range(len(lengths))]  # -1 (none), 0, 1, 2, -1, ...
    cu_q = torch.tensor([0] + [sum(q for q, _ in lengths[: i + 1]) for i in range(len(lengths))])
    cu_k = torch.tensor([0] + [sum(k for _, k in lengths[: i + 1]) for i in range(len(lengths))])
    query = torch.randn(1, Hq, int(cu_q[-1]), D, generator=g)
    key, value = (torch.randn(1, Hkv, int(cu_k[-1]), D, generator=g) for _ in range(2))
    bank = [(torch.randn(T, Hkv, P_, D, generator=g), torch.randn(T, Hkv, P_, D, generator=g))]
    module = torch.nn.Module()
    module.layer_idx = 0
    plan = _plan(cu_q, cu_k, slots, "cpu")
    out, _ = paged_prefix_attention(module, query, key, value, None, scaling=D ** -0.5,
                                    **{PREFIX_KWARG: bank, "prefix_attn_plan": plan})
    assert out.shape == (1, int(cu_q[-1]), Hq, D)
    for r, ((nq, nk), slot) in enumerate(zip(lengths, slots)):
        q = query[0, :, cu_q[r]:cu_q[r + 1]].double()
        k = key[0, :, cu_k[r]:cu_k[r + 1]].double().repeat_interleave(Hq // Hkv, 0)
        v = value[0, :, cu_k[r]:cu_k[r + 1]].double().repeat_interleave(Hq // Hkv, 0)
        visible = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + nk - nq
        if slot >= 0:
            pk, pv = (b[slot].double().repeat_interleave(Hq // Hkv, 0) for b in bank[0])
            k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
            visible = torch.cat([torch.ones(nq, P_, dtype=torch.bool), visible], 1)
        scores = (q @ k.transpose(-1, -2)) * D ** -0.5
        ref = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v  # [Hq, nq, D]
        got = out[0, cu_q[r]:cu_q[r + 1]].transpose(0, 1)
        assert (got.double() - ref).abs().max() < 1e-5, (r, slot)
